"""The choice between fastencoder's GEMM kernel and cuBLAS + the same epilogue (kernels/gemm_choice.py),
on the CPU: the device is declared a GPU and the timer is a fake that runs the candidate once (so
its outputs are real) and reports a set time for it. The cuBLAS candidate runs torch's CPU GEMM and
the epilogue kernel in Triton's interpreter."""
import importlib

import pytest
import torch

from fastencoder.kernels import geglu_linear, linear
from fastencoder.kernels.linear import geglu_linear_reference, linear_reference
from helpers import assert_close, float64_leaves, leaf

gemm_choice = importlib.import_module("fastencoder.kernels.gemm_choice")
kernel_module = importlib.import_module("fastencoder.kernels.linear_kernel")
linear_cublas = importlib.import_module("fastencoder.kernels.linear_cublas")
linear_module = importlib.import_module("fastencoder.kernels.linear")

# as tests/test_linear.py; the cuBLAS candidate's activation reads h rounded to the dtype first
# (Hugging Face's order), one more rounding of 2^-11 relative in fp16
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3)}


class FakeTimer:
    """Stands in for gemm_choice._measure: runs the candidate once and returns `times[which]`,
    `which` told by what it launched (the classic kernel, the Hopper kernel, or neither)."""

    def __init__(self, launches, classic_ms, cublas_ms, hopper_ms=None):
        self.launches, self.timed = launches, []
        self.times = {"classic": classic_ms, "cublas": cublas_ms, "hopper": hopper_ms}

    def __call__(self, run):
        before = len(self.launches)
        run()
        launched = self.launches[before:]
        which = ("classic" if "_linear_kernel" in launched else
                 "hopper" if "_linear_hopper_kernel" in launched else "cublas")
        self.timed.append(which)
        return self.times[which]


@pytest.fixture
def choosing(monkeypatch, triton_backend, kernel_launches):
    """The CPU taken for a GPU by the choice (no choice made before); returns a function that
    installs a FakeTimer with the given times."""
    monkeypatch.setattr(gemm_choice, "_on_gpu", lambda tensor: True)
    monkeypatch.setattr(gemm_choice, "_choices", type(gemm_choice._choices)())

    def install(classic_ms, cublas_ms, hopper_ms=None):
        timer = FakeTimer(kernel_launches, classic_ms, cublas_ms, hopper_ms)
        monkeypatch.setattr(gemm_choice, "_measure", timer)
        return timer

    return install


def _linear_inputs(dtype, m=37, k=100, n=70):
    return (torch.randn(m, k).to(dtype), (torch.randn(n, k) / k**0.5).to(dtype), torch.randn(n).to(dtype),
            torch.randn(m, n).to(dtype))


def _check_linear(dtype, activation, residual=True):
    """linear (bias, activation, residual) forward and backward against float64."""
    x, weight, bias, r = _linear_inputs(dtype)
    r = r if residual else None
    atol, rtol = TOLERANCES[dtype]
    inputs = [None if t is None else leaf(t) for t in (x, weight, bias, r)]
    y = linear(*inputs[:3], activation, inputs[3])
    reference = float64_leaves(x, weight, bias, r)
    expected = linear_reference(*reference[:3], activation, reference[3])
    assert_close(y, expected, atol, rtol, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy.double())
    for name, got, want in zip(("dx", "dweight", "dbias", "dresidual"), inputs, reference):
        if got is not None:
            assert_close(got.grad, want.grad, atol * max(1.0, want.grad.abs().max().item()), rtol, name)


@pytest.mark.parametrize("kernel_ms, cublas_ms, winner", [(1.0, 2.0, "classic"), (2.0, 1.0, "cublas")])
def test_the_faster_candidate_wins_and_is_kept(choosing, kernel_launches, kernel_ms, cublas_ms, winner):
    """The first call of each GEMM (forward, dx, dW) times both candidates once each and runs the
    faster; later calls of the same GEMMs time nothing and run the kept choice. Both timings are
    visible in choices()."""
    timer = choosing(kernel_ms, cublas_ms)
    _check_linear(torch.float32, "gelu")
    assert timer.timed == ["classic", "cublas"] * 3  # off sm_90 (here: no Hopper kernel), two candidates
    found = gemm_choice.choices()
    assert sorted(key.product for key in found) == ["dW", "dx", "forward"]
    assert all(choice == gemm_choice.Choice(winner, {"classic": kernel_ms, "cublas": cublas_ms})
               for choice in found.values())
    epilogues = {key.product: key.epilogue for key in found}
    assert epilogues == {"forward": "bias+gelu+act'+residual", "dx": "act'+dh", "dW": "dbias"}
    kernel_launches.clear()
    _check_linear(torch.float32, "gelu")
    assert timer.timed == ["classic", "cublas"] * 3, "a kept choice is timed again"
    if winner == "classic":
        assert kernel_launches == ["_linear_kernel"] * 3
    else:  # the forward's act and act' in the epilogue pass; dh = dy·act'(h) and db by torch
        assert kernel_launches == ["_epilogue_kernel"]
    assert all(f"classic {kernel_ms:.3f} ms, cublas {cublas_ms:.3f} ms" in gemm_choice.describe(key, choice)
               for key, choice in found.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation, residual", [(None, True), ("gelu", False), ("gelu_tanh", True), ("relu", False)])
def test_the_cublas_candidate_computes_what_the_kernel_does(choosing, poisoned_allocations, dtype, activation,
                                                            residual):
    """Every epilogue through cuBLAS + the elementwise pass, forward and backward, poisoned outputs."""
    choosing(2.0, 1.0)
    _check_linear(dtype, activation, residual)
    assert {choice.winner for choice in gemm_choice.choices().values()} == {"cublas"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("activation", ["gelu", None])
def test_geglu_through_cublas(choosing, poisoned_allocations, kernel_launches, dtype, with_bias, activation):
    choosing(2.0, 1.0)
    atol, rtol = TOLERANCES[dtype]
    x, weight = torch.randn(37, 100).to(dtype), (torch.randn(70, 100) / 10).to(dtype)
    bias = torch.randn(70).to(dtype) if with_bias else None
    inputs = [None if t is None else leaf(t) for t in (x, weight, bias)]
    y = geglu_linear(*inputs, activation=activation)
    reference = float64_leaves(x, weight, bias)
    expected = geglu_linear_reference(*reference, activation=activation)
    assert_close(y, expected, atol, rtol, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy.double())
    for name, got, want in zip(("dx", "dweight", "dbias"), inputs, reference):
        if got is not None:
            assert_close(got.grad, want.grad, atol * max(1.0, want.grad.abs().max().item()), rtol, name)
    products = {key.product: key.epilogue for key in gemm_choice.choices()}
    assert products == {"forward": ("bias+" if with_bias else "") + f"glu({activation or 'linear'})+act'",
                        "dx": "", "dW": "dbias" if with_bias else ""}
    # forward: timed as the kernel, then as cuBLAS + epilogue, which then runs; dx, dW: timed as the kernel
    assert kernel_launches == ["_linear_kernel", "_epilogue_kernel", "_epilogue_kernel", "_linear_kernel",
                               "_linear_kernel"]


class _Recorded:
    """Stands in for both candidates: runs nothing."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1


def test_choices_are_bounded_over_token_counts(choosing, monkeypatch):
    """Token counts 1…20000 (M of the forward and dx products, K of the dW product) map to at most
    11 choices per GEMM (the autotuner's buckets), and past MAX_CHOICES the least recently used
    choice is dropped."""
    monkeypatch.setattr(kernel_module, "_kernel_matmul", _Recorded())
    monkeypatch.setattr(linear_cublas, "cublas_matmul", _Recorded())
    monkeypatch.setattr(gemm_choice, "_measure", lambda run: run() or 1.0)
    weight, bias = torch.empty(48, 32, dtype=torch.float16), torch.empty(48, dtype=torch.float16)
    for tokens in sorted(set(range(1, 20001, 97)) | {2**p + o for p in range(15) for o in (0, 1)} | {20000}):
        x = torch.empty(tokens, 32, dtype=torch.float16)
        _, act_grad = linear_module._linear_fwd_impl(x, weight, bias, 1, None, True)
        linear_module._linear_bwd_impl(torch.empty(tokens, 48, dtype=torch.float16), x, weight, act_grad,
                                       True, True, True)
    per_product = {}
    for key in gemm_choice.choices():
        per_product.setdefault(key.product, set()).add(key)
    assert sorted(per_product) == ["dW", "dx", "forward"]
    assert all(len(keys) == 11 for keys in per_product.values())  # 16 … 16384
    monkeypatch.setattr(gemm_choice, "MAX_CHOICES", 5)
    first = next(iter(gemm_choice.choices()))
    # a choice made long ago used again, then four new GEMMs (new weight shapes)
    linear_module._linear_fwd_impl(torch.empty(20000, 32, dtype=torch.float16), weight, bias, 1, None, True)
    for n in (16, 24, 40, 56):
        linear_module._linear_fwd_impl(torch.empty(16, 32, dtype=torch.float16), torch.empty(n, 32, dtype=torch.float16),
                                       None, 0, None, False)
    kept = list(gemm_choice.choices())
    assert len(kept) == 5 and first not in kept
    assert (kept[0].product, kept[0].m_bucket, kept[0].n) == ("forward", 16384, 48)
    assert [key.n for key in kept[1:]] == [16, 24, 40, 56]


@pytest.mark.parametrize("recording", ["capturing", "compiling"])
def test_nothing_is_timed_while_capturing_or_compiling(choosing, kernel_launches, monkeypatch, recording):
    """While a CUDA graph captures or torch.compile traces: a GEMM without a choice runs the kernel
    and makes no choice; a GEMM with one runs it; neither is timed."""
    choosing(2.0, 1.0)
    x, weight, bias, _ = _linear_inputs(torch.float32)
    with torch.no_grad():
        linear(x, weight, bias, "gelu")  # eagerly: timed, cuBLAS chosen
    assert len(gemm_choice.choices()) == 1

    def no_timing(run):
        raise AssertionError("timed while recording")

    monkeypatch.setattr(gemm_choice, "_measure", no_timing)
    if recording == "capturing":
        monkeypatch.setattr(gemm_choice, "capturing_or_compiling", lambda tensor: True)
    else:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    kernel_launches.clear()
    with torch.no_grad():
        y = linear(x, weight, bias, "gelu")  # the kept choice
        z = linear(x, weight, bias, "relu")  # no choice yet: the kernel
    assert kernel_launches == ["_epilogue_kernel", "_linear_kernel"]
    assert len(gemm_choice.choices()) == 1
    for out, activation in ((y, "gelu"), (z, "relu")):
        assert_close(out, linear_reference(x.double(), weight.double(), bias.double(), activation), 2e-5, 2e-5,
                     activation)


@pytest.mark.parametrize("candidate", ["classic", "cublas"])
def test_a_forced_candidate_runs_untimed(choosing, kernel_launches, monkeypatch, candidate):
    monkeypatch.setattr(gemm_choice, "_measure", lambda run: pytest.fail("timed while forced"))
    monkeypatch.setattr(gemm_choice, "_forced", None)
    gemm_choice.force(candidate)
    x, weight, bias, _ = _linear_inputs(torch.float32)
    with torch.no_grad():
        y = linear(x, weight, bias, "gelu")
    assert kernel_launches == ["_linear_kernel" if candidate == "classic" else "_epilogue_kernel"]
    assert gemm_choice.choices() == {} and gemm_choice.forced() == candidate
    assert_close(y, linear_reference(x.double(), weight.double(), bias.double(), "gelu"), 2e-5, 2e-5, "y")
    with pytest.raises(ValueError, match="candidate must be None or one of"):
        gemm_choice.force("cudnn")


def test_cpu_tensors_never_choose(triton_backend, kernel_launches, monkeypatch):
    """Off a GPU (Triton's interpreter) every GEMM is the kernel, with no choice made or timed."""
    monkeypatch.setattr(gemm_choice, "_measure", lambda run: pytest.fail("timed on the CPU"))
    x, weight, bias, _ = _linear_inputs(torch.float32)
    before = gemm_choice.choices()
    linear(leaf(x), weight, bias, "gelu").sum().backward()
    assert kernel_launches == ["_linear_kernel"] * 2 and gemm_choice.choices() == before


def test_the_report_compiles_what_the_epilogue_launches(choosing, launch_arguments):
    """The elementwise epilogue after cuBLAS, launched with feature sizes that are multiples of 16
    (as every model's are), runs a specialisation the report compiles, as tests/test_report.py
    checks for the other kernels."""
    from test_report import _runtime_arguments, _specialisation

    from fastencoder.kernels import report

    choosing(2.0, 1.0)
    for tokens in (64, 37):
        x, weight, bias, residual = _linear_inputs(torch.float32, tokens, 64, 64)
        linear(leaf(x), leaf(weight), bias, "gelu").sum().backward()
        linear(x, weight, bias, None, residual)
        geglu_linear(leaf(x), leaf(weight)).sum().backward()
    cases = [case for case in report.all_cases("linear epilogue")]
    kernel = cases[0]["fn"]
    runtime = _runtime_arguments(kernel)
    compiled = {(frozenset(a for a in case["constexprs"] if a in runtime), frozenset(case["divisible_by_16"]))
                for case in cases}
    launched = [arguments for name, arguments in launch_arguments if name == "_epilogue_kernel"]
    # gelu, residual, geglu: timed once and run at 64 tokens; run at 37 (the same bucket, chosen)
    assert len(launched) == 3 * 2 + 3
    for arguments in launched:
        integers = {a: arguments[a] for a in runtime if type(arguments[a]) is int}
        ones, divisible = _specialisation(kernel, integers)
        assert (frozenset(ones), frozenset(divisible)) in compiled, integers
