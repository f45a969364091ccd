"""Static kernel report: compile every kernel variant for sm_80 and sm_90a, no GPU needed.

For each case that a kernel module lists in `compile_cases()` (every autotune config × dtype ×
flag variant it launches) this compiles with `triton.compile(..., target=GPUTarget(...))`, reads
registers, spill (stack) bytes and shared memory from the cubin with the cuobjdump that Triton
ships, and checks that the sm_90a SASS of matmul-class kernels uses wgmma (HGMMA). It prints one
table and exits non-zero on a compile failure, a spill, too much shared memory, or missing HGMMA.

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

KERNEL_MODULES = ("layer_norm", "linear", "attention", "padding")
ARCHS = {"sm_80": 80, "sm_90a": 90}
# Shared memory one block may use (opt-in maximum): A100 and H100/H200.
MAX_SHARED = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}


def all_cases(name_filter=""):
    cases = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"{__package__}.{module_name}")
        cases += [case for case in module.compile_cases() if name_filter in case["name"]]
    return cases


def _cuobjdump():
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_case(case, arch):
    """Compile one case for one arch; returns a dict of what the cubin says, or an error."""
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
    source = ASTSource(case["fn"], signature, constexprs, aligned)
    try:
        compiled = triton.compile(
            source, target=GPUTarget("cuda", ARCHS[arch], 32),
            options=dict(num_warps=case["num_warps"], num_stages=case["num_stages"]),
        )
    except Exception as error:  # any compiler failure is a finding of the report
        return dict(error=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
        hgmma = None
        if arch == "sm_90a":
            sass = subprocess.run(
                [_cuobjdump(), "--dump-sass", cubin.name], capture_output=True, text=True, check=True
            ).stdout
            hgmma = sass.count("HGMMA")
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return dict(
        registers=int(fields["REG"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]),
        shared=int(fields["SHARED"]) + compiled.metadata.shared, hgmma=hgmma,
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
    return found


_CASES = []


def _compile_index(index):
    return {arch: compile_case(_CASES[index], arch) for arch in ARCHS}


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
    if "error" in result:
        return "compile failed"
    return f"{result['registers']} / {result['stack']} / {result['shared'] // 1024}K"


def format_table(rows):
    header = "| kernel variant | sm_80 regs / spill B / smem | sm_90a regs / spill B / smem | sm_90a HGMMA | ok |"
    lines = [header, "|---|---|---|---|---|"]
    for case, result, found in rows:
        hgmma = result["sm_90a"].get("hgmma")
        lines.append(
            f"| {case['name']} | {_cell(result['sm_80'])} | {_cell(result['sm_90a'])} | "
            f"{'-' if hgmma is None else hgmma} | {'yes' if not found else 'NO: ' + '; '.join(found)} |"
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
    summary = f"{len(rows)} kernel variants, each compiled for {' and '.join(ARCHS)}: " + (
        f"{len(failed)} with problems" if failed else "all compile, 0 spills, HGMMA where expected"
    )
    print(summary)
    if args.markdown:
        args.markdown.write_text(f"{table}\n\n{summary}\n")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
