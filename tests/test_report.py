"""The static kernel report: every kernel variant compiles for sm_80 and sm_90a, with no spills and
(for matmul-class kernels) wgmma on sm_90a; the main-loop instruction count and the CTAs per SM it
lists. Runs without a GPU."""
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from fastencoder.kernels import _launch as launch
from fastencoder.kernels import layer_norm, linear, pad, report, unpad


@pytest.mark.parametrize("kernel", report.KERNEL_MODULES)
def test_every_variant_compiles_without_spills(kernel, tmp_path):
    # the report compiles real GPU code: the interpreter must be off when kernels are defined
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    table = tmp_path / "report.md"
    result = subprocess.run(
        [sys.executable, "-m", "fastencoder.kernels.report", "--filter", kernel, "--markdown", str(table)],
        env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = [line for line in table.read_text().splitlines() if line.startswith(f"| {kernel}")]
    assert rows and all(line.endswith("| yes |") for line in rows)


def test_problems_are_reported():
    case = dict(matmul=True)
    clean = dict(registers=128, stack=0, local=0, shared=1024, hgmma=4, ctas=2)
    assert report.problems(case, {"sm_80": dict(clean, hgmma=None), "sm_90a": clean}) == []
    found = report.problems(case, {"sm_80": dict(clean, stack=16), "sm_90a": dict(clean, hgmma=0)})
    assert found == ["sm_80: spills (16 stack bytes, 0 local)", "sm_90a: no HGMMA in the SASS of a matmul-class kernel"]
    assert report.problems(case, {"sm_80": {"error": "boom"}, "sm_90a": clean}) == ["sm_80: compile failed: boom"]
    # a case meant for two CTAs per SM on sm_90a; any kernel needs at least one
    two = dict(case, min_ctas={"sm_90a": 2})
    assert report.problems(two, {"sm_80": dict(clean, ctas=1), "sm_90a": clean}) == []
    assert report.problems(two, {"sm_80": clean, "sm_90a": dict(clean, ctas=1)}) == [
        "sm_90a: 1 CTAs per SM, the config is meant for 2"]
    assert report.problems(case, {"sm_80": dict(clean, ctas=0), "sm_90a": clean}) == [
        "sm_80: 0 CTAs per SM, the config is meant for 1"]


def _sass(*lines):
    """cuobjdump-style SASS of one kernel: one instruction per 16 bytes, each followed by the
    second half of its encoding on a line of its own, as cuobjdump prints them."""
    return "\n".join(
        f"        /*{16 * index:04x}*/                   {line} ;   /* 0x000000000000794d */\n"
        f"                                                   /* 0x000fea0003800000 */"
        for index, line in enumerate(lines)
    )


def _kernel(*lines):
    """SASS of a kernel that ends as ptxas ends every kernel: EXIT, then a branch to itself."""
    return _sass(*lines, "EXIT", f"BRA 0x{16 * (len(lines) + 1):x}")


def test_a_kernel_without_a_loop_has_no_main_loop():
    assert report.main_loop(_kernel("S2R R0, SR_CTAID.X", "@P0 BRA 0x40", "IADD3 R1, R0, 0x1, RZ",
                                    "STG.E [R2.64], R1")) == []


def test_the_loop_runs_from_the_backward_branch_target_to_the_branch():
    sass = _kernel("S2R R0, SR_CTAID.X",           # 0x00
                   "MOV R1, RZ",                    # 0x10: loop start
                   "HMMA.16816.F32 R4, R8, R12, R4",
                   "IADD3 R1, R1, 0x1, RZ",
                   "ISETP.GE.AND P0, PT, R1, R2, PT",
                   "@!P0 BRA 0x10",                 # 0x50: back to 0x10
                   "STG.E [R2.64], R4")
    body = report.main_loop(sass)
    assert [address for address, _ in body] == [0x10, 0x20, 0x30, 0x40, 0x50]
    assert body[-1][1] == "@!P0 BRA 0x10"


def test_forward_branches_inside_a_loop_stay_in_it():
    sass = _kernel("MOV R1, RZ",                    # 0x00: loop start
                   "@P1 BRA 0x40",                  # skips the masked part forward
                   "FSEL R4, R4, -INF , P2",
                   "BSSY B0, 0x60",
                   "FMUL R4, R4, R5",               # 0x40
                   "BSYNC B0",
                   "BRA.U !UP0, 0x0")               # 0x60: unconditional-form branch back to 0x00
    assert len(report.main_loop(sass)) == 7


def test_nested_loops_count_the_inner_one():
    sass = _kernel("MOV R1, RZ",                    # 0x00: outer loop start
                   "MOV R2, RZ",                    # 0x10: inner loop start
                   "FFMA R4, R5, R6, R4",
                   "IADD3 R2, R2, 0x1, RZ",
                   "@P0 BRA 0x10",                  # 0x40: inner back edge
                   "IADD3 R1, R1, 0x1, RZ",
                   "@P1 BRA 0x0")                   # 0x60: outer back edge
    assert [address for address, _ in report.main_loop(sass)] == [0x10, 0x20, 0x30, 0x40]


def test_of_loops_in_sequence_the_largest_counts():
    sass = _kernel("FADD R4, R4, R5",               # 0x00: first pass, 2 instructions
                   "@P0 BRA 0x0",
                   "FMUL R6, R4, R4",               # 0x20: second pass, 4 instructions
                   "FFMA R7, R6, R6, R7",
                   "STG.E [R2.64], R7",
                   "@!P1 BRA 0x20",
                   "IADD3 R0, R0, 0x1, RZ",         # 0x60: a loop around the second pass only
                   "@P2 BRA 0x20")
    assert [address for address, _ in report.main_loop(sass)] == [0x20, 0x30, 0x40, 0x50]
    # the report lists every innermost loop, in code order (the outer loop around the second is not one)
    assert [len(body) for body in report.innermost_loops(sass)] == [2, 4]


# The kernel the GEMM + GELU variants launch: its main loop is the K loop, which on sm_90a issues
# every wgmma (HGMMA) of the kernel and on sm_80 every mma (HMMA), loads the next stage with
# cp.async (LDGSTS), and stores nothing to global memory (the epilogue's STG follow the loop).
_REAL_KERNEL = """
import json, sys
from fastencoder.kernels import _launch as launch
from fastencoder.kernels import layer_norm, linear, pad, report, unpad
case = next(c for c in report.all_cases("linear fwd+gelu ") if c["name"].endswith("fp16"))
print(json.dumps({arch: dict(sass=report.cuobjdump("--dump-sass", report.compile_for(case, arch).asm["cubin"]),
                             result=report.compile_case(case, arch)) for arch in report.ARCHS}))
"""


def test_main_loop_of_a_compiled_gemm_is_its_k_loop():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _REAL_KERNEL], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    for arch, found in json.loads(done.stdout).items():
        sass, result = found["sass"], found["result"]
        body = [text for _, text in report.main_loop(sass)]
        mma = "HGMMA" if arch == "sm_90a" else "HMMA"
        assert sum(mma in text for text in body) == sass.count(mma) > 0, arch
        assert any(text.startswith("LDGSTS") for text in body), arch
        assert not any(text.startswith("STG") for text in body) and "STG" in sass, arch
        assert len(body) < len(report._INSTRUCTION.findall(sass)), arch
        assert max(result["loops"]) == len(body), arch


@pytest.mark.parametrize("arch, registers, warps, shared, ctas", [
    ("sm_90a", 128, 8, 48 * 1024, 2),    # registers: 128 x 32 = 4096 per warp, 4 warps per partition
    ("sm_90a", 168, 8, 48 * 1024, 1),    # 5376 per warp: 3 warps per partition, 12 per SM
    ("sm_90a", 114, 8, 48 * 1024, 2),    # 114 rounds up to 120 per thread: still 4 per partition
    ("sm_90a", 200, 1, 0, 8),            # 6400 per warp: 2 per partition; 16K / 6400 x 4 would say 10
    ("sm_90a", 24, 4, 0, 16),            # warp slots: 64 / 4 (registers would allow 21)
    ("sm_90a", 32, 1, 0, 32),            # block slots
    # registers allow 4 CTAs of 8 warps at 64 per thread; shared memory, with the 1 KB reservation:
    ("sm_90a", 64, 8, 96 * 1024, 2),     # 2 x (96 + 1) KB fit in 228 KB
    ("sm_80", 64, 8, 96 * 1024, 1),      # but not in 164 KB
    ("sm_90a", 64, 8, 113 * 1024, 2),    # 2 x 114 KB = 228 KB exactly
    ("sm_90a", 64, 8, 113 * 1024 + 1, 1),  # one byte more (rounded up to 128 B) and only one fits
    ("sm_90a", 64, 8, 128 * 1024, 1),
    ("sm_80", 64, 8, 40 * 1024, 4),      # 164 KB / 41 KB
])
def test_ctas_per_sm(arch, registers, warps, shared, ctas):
    assert report.ctas_per_sm(arch, registers, warps, shared) == ctas



def _specialisation(kernel, integers):
    """(the arguments a launch compiles as the constant 1, those it compiles as multiples of 16),
    as Triton's runtime specialises integer arguments: {name: value} of the launch's integers."""
    unspecialised = launch.unspecialised(kernel)
    specialised = {name: value for name, value in integers.items() if name not in unspecialised}
    return ({name for name, value in specialised.items() if value == 1},
            {name for name, value in specialised.items() if value != 1 and value % 16 == 0})


def _runtime_arguments(kernel):
    """The kernel's arguments that are not constexpr (tensors included)."""
    parameters = inspect.signature(kernel.fn).parameters
    return [name for name in kernel.arg_names if "constexpr" not in str(parameters[name].annotation)]


def test_the_report_compiles_what_the_ops_launch(device, triton_backend, launch_arguments):
    """Triton specialises a launch on each integer argument equal to 1 (compiled as that constant)
    or divisible by 16 (an alignment fact the compiler uses) unless the kernel says not to. At
    lengths, head counts and token counts that are multiples of 16 (as BERT's S = 128 or 512 with 16
    heads, B x S tokens) and that are not, every op's every launch (attention padded, masked, with a
    mask of stride 2 over keys, packed, biased, with a relative bias, with dropout, with a sliding
    window and rotary embeddings; linear with GELU, residual and both backward products; LayerNorm
    with a residual; pad and unpad), forward and backward, runs a specialisation that one of the
    report's cases of that kernel compiles exactly."""
    from fastencoder.kernels.attention import attention

    torch.manual_seed(0)
    run = lambda out: out.float().sum().backward()
    qkv = torch.randn(2, 32, 3, 16, 16, device=device, requires_grad=True)
    q, k, v = qkv.unbind(2)
    mask = torch.ones(2, 32, dtype=torch.bool, device=device)
    mask[1, 20:] = False
    packed = torch.randn(45, 3, 16, 16, device=device, requires_grad=True).unbind(1)
    run(attention(q, k, v))
    run(attention(q, k, v, key_padding_mask=mask, dropout_p=0.1))
    run(attention(q, k, v, key_padding_mask=mask.repeat_interleave(2, dim=1)[:, ::2]))
    run(attention(q, k, v, bias=torch.randn(2, 1, 1, 32, device=device)))
    run(attention(q, k, v, key_padding_mask=mask,
                  relative_bias=torch.randn(16, 63, device=device, requires_grad=True)))
    run(attention(*packed, cu_seqlens=torch.tensor([0, 32, 45], dtype=torch.int32, device=device),
                  max_seqlen=32, dropout_p=0.1))
    rotary = tuple(torch.randn(32, 16, device=device) for _ in range(2))  # cos, sin: any fp32 [P, D] tables
    run(attention(q, k, v, key_padding_mask=mask, window=5, rotary=rotary))
    run(attention(*packed, cu_seqlens=torch.tensor([0, 32, 45], dtype=torch.int32, device=device),
                  max_seqlen=32, window=16, rotary=rotary, dropout_p=0.1))
    weight = torch.randn(128, 128, device=device, requires_grad=True)
    bias = torch.randn(128, device=device, requires_grad=True)
    for tokens in (64, 37):
        x = torch.randn(tokens, 128, device=device, requires_grad=True)
        run(linear(x, weight, bias, activation="gelu", residual=torch.randn(tokens, 128, device=device)))
        norm_weight, norm_bias = torch.ones(384, device=device), torch.zeros(384, device=device)
        hidden = torch.randn(tokens, 384, device=device, requires_grad=True)
        run(layer_norm(hidden, norm_weight, norm_bias, 1e-12, residual=torch.randn_like(hidden)))
    hidden = torch.randn(2, 24, 64, device=device, requires_grad=True)
    indices = torch.tensor([0, 1, 2, 24, 25], device=device)
    run(pad(unpad(hidden, indices), indices, 2, 24))

    cases = report.all_cases()
    launched = set()
    for name, arguments in launch_arguments:
        kernel_cases = [case for case in cases if case["fn"].fn.__name__ == name]
        assert kernel_cases, f"{name} is launched but has no case in the report"
        kernel = kernel_cases[0]["fn"]
        integers = {argument: arguments[argument] for argument in _runtime_arguments(kernel)
                    if type(arguments[argument]) is int}
        runtime = _runtime_arguments(kernel)
        compiled = {(frozenset(argument for argument in case["constexprs"] if argument in runtime),
                     frozenset(case.get("divisible_by_16", ()))) for case in kernel_cases}
        ones, divisible = _specialisation(kernel, integers)
        assert (frozenset(ones), frozenset(divisible)) in compiled, (
            f"{name} launched with {integers}: constant 1 {sorted(ones)}, divisible by 16 {sorted(divisible)}; "
            f"the report compiles {sorted(map(lambda c: (sorted(c[0]), sorted(c[1])), compiled))}")
        launched.add(name)
    assert {"_attention_fwd_kernel", "_attention_bwd_delta_kernel", "_attention_bwd_dkdv_kernel",
            "_attention_bwd_dq_kernel", "_linear_kernel", "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel",
            "_unpad_kernel", "_pad_kernel"} <= launched


def test_every_attention_config_compiles_with_and_without_a_bias():
    """A config that serves calls with and without a dense bias is compiled both ways, with the key
    mask and dropout: the flags change the loops' structure, not only what a tile loads (the no-bias
    variants of such configs once spilled unseen behind their bias variant)."""
    import importlib

    configs = importlib.import_module("fastencoder.kernels.attention.configs")
    cases = importlib.import_module("fastencoder.kernels.attention.cases")
    compiled = {(case["fn"], case["constexprs"]["HEAD_DIM"], case["signature"]["Q"], case["constexprs"]["ALLOW_TF32"],
                 case["constexprs"]["BLOCK_M"], case["constexprs"]["BLOCK_N"], case["num_warps"], case["num_stages"],
                 case["constexprs"]["HAS_BIAS"])
                for case in report.all_cases() if case["name"].startswith("attention_")
                and "HAS_BIAS" in case["constexprs"] and case["constexprs"]["HAS_KEY_MASK"]
                and case["constexprs"]["HAS_DROPOUT"] and not case["constexprs"]["RELATIVE_BIAS"]
                and not case["constexprs"]["ROTARY"]}
    for dtype, name in ((torch.float16, "*fp16"), (torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):  # q's pointer
        for allow_tf32 in (False, True) if dtype == torch.float32 else (False,):
            for head_dim in configs.SUPPORTED_HEAD_DIMS:
                for has_bias in (False, True):
                    dkdv, dq = configs._bwd_configs(head_dim, dtype, allow_tf32, has_bias)
                    fwd = configs._fwd_config(head_dim, dtype, allow_tf32, has_bias, True)
                    for kernel, config in ((cases._attention_fwd_kernel, fwd),
                                           (cases._attention_bwd_dkdv_kernel, dkdv),
                                           (cases._attention_bwd_dq_kernel, dq)):
                        assert (kernel, head_dim, name, allow_tf32, *config, has_bias) in compiled, \
                            (kernel.fn.__name__, head_dim, name, allow_tf32, config, has_bias)
