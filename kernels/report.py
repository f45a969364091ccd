"""Static kernel report: compile every kernel variant for sm_80 and sm_90a, no GPU needed.

For each case that a kernel module lists in `compile_cases()` (every autotune config × dtype ×
flag variant it launches) this compiles with `triton.compile(..., target=GPUTarget(...))`, reads
registers, spill (stack) bytes and shared memory from the cubin with the cuobjdump that Triton
ships, counts the SASS instructions of one iteration of each innermost loop, works out how many CTAs
(program instances) fit on one SM at once, and checks that the sm_90a SASS of matmul-class kernels
uses wgmma (HGMMA) and that of tensor-descriptor kernels loads by TMA (UTMALDG). It prints one table and exits non-zero on a compile failure, a spill, too much
shared memory, missing HGMMA, or fewer CTAs per SM than a case is meant for.

    python -m fastencoder.kernels.report [--filter TEXT] [--markdown FILE] [--jobs N]
"""
import argparse
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from ._launch import cdiv

KERNEL_MODULES = ("layer_norm", "linear", "attention", "padding")
ARCHS = {"sm_80": 80, "sm_90a": 90}
# Shared memory one block may use (opt-in maximum): A100 and H100/H200.
MAX_SHARED = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}

# How many CTAs (program instances) fit on one SM at once, as NVIDIA's occupancy calculator works
# it out (CUDA C++ Programming Guide, "Compute Capabilities" table, and the calculator's rules):
# the least of what each resource allows, with
#   registers: a warp gets registers*32 rounded up to 256, from one of the SM's four partitions of
#              16K registers; a partition holds floor(16K / that) warps, the SM four times as many;
#   warps:     64 resident warps (2048 threads) per SM;
#   shared:    the SM's shared memory over what a CTA takes: its static and dynamic shared memory
#              plus 1 KB the driver reserves per CTA (since compute capability 8.0), rounded up to 128 B;
#   blocks:    32 resident CTAs per SM.
# Compute capabilities 8.0 (A100) and 9.0 (H100/H200) share every constant but the shared memory.
SM_SHARED = {"sm_80": 164 * 1024, "sm_90a": 228 * 1024}
SM_REGISTER_PARTITIONS, PARTITION_REGISTERS, REGISTER_UNIT = 4, 16 * 1024, 256
SM_WARPS, SM_CTAS = 64, 32
RESERVED_SHARED, SHARED_UNIT = 1024, 128


def _round_up(value, unit):
    return cdiv(value, unit) * unit


def ctas_per_sm(arch, registers, warps, shared):
    """CTAs of `warps` warps, `registers` registers per thread and `shared` bytes of static plus
    dynamic shared memory that can be resident on one SM of `arch` at once."""
    warps_by_registers = PARTITION_REGISTERS // _round_up(registers * 32, REGISTER_UNIT) * SM_REGISTER_PARTITIONS
    cta_shared = _round_up(shared + RESERVED_SHARED, SHARED_UNIT)
    return min(warps_by_registers // warps, SM_WARPS // warps, SM_SHARED[arch] // cta_shared, SM_CTAS)


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
# a branch, predicated or not, any variant (BRA.U, BRA.DIV...); its target is its last address
_BRANCH = re.compile(r"(?:@!?U?P\w+\s+)?BRA\b.*?(0x[0-9a-f]+)\s*$")


def innermost_loops(sass):
    """The SASS instructions of one iteration of each innermost loop (one that contains no other
    loop) of a kernel, in code order: [[(address, instruction)]], from cuobjdump's SASS of one
    kernel; [] for a kernel without a loop.

    A loop is a backward branch: from its target to the branch, inclusive (a branch to itself is
    the endless trap ptxas puts after the last EXIT, not a loop). Innermost loops are the ones that
    run most often; a kernel may have several: in sequence (a loop over full blocks and one over
    the ragged tail, two passes over a row) or as alternatives (attention's loop over keys bounded
    by a length, and its loop that reads a mask's bytes)."""
    instructions, loops = [], []
    for match in _INSTRUCTION.finditer(sass):
        address, text = int(match[1], 16), match[2].strip()
        instructions.append((address, text))
        branch = _BRANCH.match(text)
        if branch and int(branch[1], 16) < address:
            loops.append((int(branch[1], 16), address))
    innermost = sorted(
        (start, end) for start, end in loops
        if not any((start, end) != other and start <= other[0] and other[1] <= end for other in loops)
    )
    return [[(a, text) for a, text in instructions if start <= a <= end] for start, end in innermost]


def main_loop(sass):
    """The largest innermost loop (see `innermost_loops`): where a kernel has several, the one
    that does its work, the others being shorter versions of it or cheap passes."""
    return max(innermost_loops(sass), key=len, default=[])


def all_cases(name_filter=""):
    cases = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"{__package__}.{module_name}")
        cases += [case for case in module.compile_cases() if name_filter in case["name"]]
    return cases


def _cuobjdump():
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def cuobjdump(option, cubin):
    """What Triton's cuobjdump prints for a cubin (bytes) with one option."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([_cuobjdump(), option, file.name], capture_output=True, text=True, check=True).stdout


def compile_for(case, arch):
    """The Triton compilation of one case for one arch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # torch allocations are 256-byte aligned and a case names its integers that are multiples of
    # 16: the runtime specialises launches on both, so the code compiled here is the code that runs
    divisible = set(case.get("divisible_by_16", ()))
    constexprs = case["constexprs"]
    signature = {
        name: "constexpr" if name in constexprs else case["signature"][name]
        for name in case["fn"].arg_names
    }
    aligned = {
        (index,): [["tt.divisibility", 16]]
        for index, (name, kind) in enumerate(signature.items())
        if kind.startswith("*") or name in divisible
    }
    return triton.compile(
        ASTSource(case["fn"], signature, constexprs, aligned), target=GPUTarget("cuda", ARCHS[arch], 32),
        options=dict(num_warps=case["num_warps"], num_stages=case["num_stages"]),
    )


def compile_case(case, arch):
    """Compile one case for one arch; returns a dict of what the cubin says, or an error."""
    try:
        compiled = compile_for(case, arch)
    except Exception as error:  # any compiler failure is a finding of the report
        return dict(error=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    usage = cuobjdump("--dump-resource-usage", compiled.asm["cubin"])
    sass = cuobjdump("--dump-sass", compiled.asm["cubin"])
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    registers, shared = int(fields["REG"]), int(fields["SHARED"]) + compiled.metadata.shared
    # sm_90a cubins declare 1 KB of static shared memory for the driver's reserved window (a
    # __nv_reservedSMEM symbol); counted here like the occupancy calculator counts any static
    # shared memory, next to the reservation itself: it may cost a CTA, never add one
    return dict(
        registers=registers, stack=int(fields["STACK"]), local=int(fields["LOCAL"]), shared=shared,
        hgmma=sass.count("HGMMA") if arch == "sm_90a" else None,
        utmaldg=sass.count("UTMALDG") if arch == "sm_90a" else None,
        loops=[len(body) for body in innermost_loops(sass)],
        ctas=ctas_per_sm(arch, registers, case["num_warps"], shared),
    )


def problems(case, results):
    found = []
    for arch, result in results.items():
        if "error" in result:
            found.append(f"{arch}: compile failed: {result['error']}")
            continue
        if result["stack"] or result["local"]:
            found.append(f"{arch}: spills ({result['stack']} stack bytes, {result['local']} local)")
        if result["shared"] > MAX_SHARED[arch]:
            found.append(f"{arch}: {result['shared']} bytes of shared memory > {MAX_SHARED[arch]}")
        if arch == "sm_90a" and case["matmul"] and not result["hgmma"]:
            found.append("sm_90a: no HGMMA in the SASS of a matmul-class kernel")
        if arch == "sm_90a" and case.get("tma") and not result["utmaldg"]:
            found.append("sm_90a: no descriptor loads (UTMALDG) in the SASS of a tensor-descriptor kernel")
        meant_for = case.get("min_ctas", {}).get(arch, 1)  # a case may name the CTAs per SM it is for
        if result["ctas"] < meant_for:
            found.append(f"{arch}: {result['ctas']} CTAs per SM, the config is meant for {meant_for}")
    return found


_CASES = []


def _compile_index(index):
    # a case may be for some archs only (the tensor-descriptor kernels: sm_90a)
    return {arch: compile_case(_CASES[index], arch) for arch in _CASES[index].get("archs", ARCHS)}


def run(name_filter="", jobs=None, quick=False):
    """Compile every case (with quick, the first variant of each kernel only); returns
    [(case, {arch: result}, [problems])]."""
    cases = all_cases(name_filter)
    if quick:
        cases = list({case["fn"].__name__: case for case in reversed(cases)}.values())
    _CASES[:] = cases
    jobs = jobs or os.cpu_count() or 1
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_compile_index, range(len(_CASES)), chunksize=1)
    else:
        results = [_compile_index(index) for index in range(len(_CASES))]
    return [(case, result, problems(case, result)) for case, result in zip(_CASES, results)]


def _cell(result):
    if not result:
        return "-"
    if "error" in result:
        return "compile failed"
    return f"{result['registers']} / {result['stack']} / {result['shared'] // 1024}K"


def _number(result, key):
    return "-" if result.get(key) is None else str(result[key])


def _loops(result):
    return ", ".join(map(str, result.get("loops") or [])) or "-"


def format_table(rows):
    header = ("| kernel variant | sm_80 regs / spill B / smem | sm_90a regs / spill B / smem | sm_80 CTAs/SM "
              "| sm_90a CTAs/SM | sm_80 SASS instr / iteration, each innermost loop | sm_90a SASS instr / iteration, each "
              "innermost loop | sm_90a HGMMA | sm_90a UTMALDG | ok |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for case, result, found in rows:
        sm80, sm90 = result.get("sm_80", {}), result.get("sm_90a", {})
        lines.append(
            f"| {case['name']} | {_cell(sm80)} | {_cell(sm90)} | {_number(sm80, 'ctas')} | "
            f"{_number(sm90, 'ctas')} | {_loops(sm80)} | {_loops(sm90)} | "
            f"{_number(sm90, 'hgmma')} | {_number(sm90, 'utmaldg')} | {'yes' if not found else 'NO: ' + '; '.join(found)} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastencoder report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--filter", default="", help="only kernel variants whose name contains this")
    parser.add_argument("--markdown", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: all cores)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = run(args.filter, args.jobs)
    table = format_table(rows)
    print(table)
    failed = [row for row in rows if row[2]]
    import triton

    summary = (f"{len(rows)} kernel variants, each compiled for {' and '.join(ARCHS)} (the tensor-descriptor ones "
               f"for sm_90a only) by Triton "
               f"{triton.__version__}: ") + (
        f"{len(failed)} with problems" if failed else "all compile, 0 spills, HGMMA and CTAs per SM where expected"
    )
    print(summary)
    if args.markdown:
        args.markdown.write_text(f"{table}\n\n{summary}\n")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
