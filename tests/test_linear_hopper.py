"""The Hopper GEMM (kernels/linear_hopper.py: tensor descriptors, persistent programs) in Triton's
interpreter, which runs host-side tensor descriptors (out-of-bounds loads read zeros, stores are
clipped): every product and epilogue the ops launch against float64, by forcing the choice to it on
a CPU declared a GPU. Three persistent programs walk the tiles, so each takes several."""
import importlib

import pytest
import torch

from fastencoder.kernels import geglu_linear, linear
from fastencoder.kernels.linear import geglu_linear_reference, linear_reference
from helpers import assert_close, float64_leaves, leaf

gemm_choice = importlib.import_module("fastencoder.kernels.gemm_choice")
linear_hopper = importlib.import_module("fastencoder.kernels.linear_hopper")

# as tests/test_linear.py (inputs rounded to the dtype, float64 reference on those values)
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3)}


@pytest.fixture
def hopper(monkeypatch, triton_backend, kernel_launches):
    """Every GEMM runs the Hopper kernel where its descriptors take the operands (the CPU declared
    a GPU, and an sm_90 one); yields the launches."""
    monkeypatch.setattr(gemm_choice, "_on_gpu", lambda tensor: True)
    monkeypatch.setattr(linear_hopper, "runs_on", lambda tensor: True)
    monkeypatch.setattr(gemm_choice, "_forced", "hopper")
    yield kernel_launches


@pytest.fixture
def tf32():
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    yield
    torch.backends.cuda.matmul.fp32_precision = previous


def _check(inputs, op, reference, dtype):
    atol, rtol = TOLERANCES[dtype]
    ours = [None if t is None else leaf(t) for t in inputs]
    theirs = float64_leaves(*inputs)
    y, expected = op(*ours), reference(*theirs)
    assert_close(y, expected, atol, rtol, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy.double())
    for index, (got, want) in enumerate(zip(ours, theirs)):
        if got is not None and got.requires_grad:
            assert_close(got.grad, want.grad, atol * max(1.0, want.grad.abs().max().item()), rtol, f"grad {index}")


# M = 37, K = 104, N = 72 cross the interpreter's 32x32x32 tile on every edge (row strides stay
# 16-byte aligned, as descriptors need)
@pytest.mark.parametrize("activation, with_residual", [(None, True), ("gelu", False), ("gelu_tanh", True),
                                                       ("relu", False)])
def test_linear_on_the_hopper_kernel(hopper, poisoned_allocations, activation, with_residual):
    """The forward (bias, activation, act' stored, residual), dx (act' applied to dy, dh written)
    and dW (bias gradient reduced) products, fp16."""
    dtype = torch.float16
    x, weight = torch.randn(37, 104).to(dtype), (torch.randn(72, 104) / 10).to(dtype)
    bias, residual = torch.randn(72).to(dtype), torch.randn(37, 72).to(dtype) if with_residual else None
    _check((x, weight, bias, residual), lambda x, w, b, r: linear(x, w, b, activation, r),
           lambda x, w, b, r: linear_reference(x, w, b, activation, r), dtype)
    assert hopper == ["_linear_hopper_kernel"] * 3


@pytest.mark.parametrize("with_bias", [False, True])
def test_geglu_on_the_hopper_kernel(hopper, poisoned_allocations, with_bias):
    """Two accumulators over the same A tile, B tiles from rows n and I + n (I = 40: the u half's
    last tile reads gate rows, which are never stored)."""
    dtype = torch.float16
    x, weight = torch.randn(37, 104).to(dtype), (torch.randn(80, 104) / 10).to(dtype)
    bias = torch.randn(80).to(dtype) if with_bias else None
    _check((x, weight, bias), geglu_linear, geglu_linear_reference, dtype)
    assert hopper == ["_linear_hopper_kernel"] * 3


def test_tf32_forward_on_the_hopper_kernel(hopper, tf32):
    """fp32 takes the Hopper kernel with TF32 allowed, in the forward only (wgmma reads TF32
    operands along K: dx and dW run the classic kernel). The interpreter multiplies in full fp32."""
    x, weight, bias = torch.randn(37, 104), torch.randn(72, 104) / 10, torch.randn(72)
    _check((x, weight, bias), lambda x, w, b: linear(x, w, b, "gelu"),
           lambda x, w, b: linear_reference(x, w, b, "gelu"), torch.float32)
    assert hopper == ["_linear_hopper_kernel", "_linear_kernel", "_linear_kernel"]


def test_operands_descriptors_cannot_take_run_the_classic_kernel(hopper):
    """A row stride of 100 fp16 elements (200 bytes) is not 16-byte aligned: the classic kernel."""
    dtype = torch.float16
    x, weight, bias = torch.randn(37, 100).to(dtype), (torch.randn(72, 100) / 10).to(dtype), torch.randn(72).to(dtype)
    assert not linear_hopper.eligible(x, weight.t(), torch.empty(37, 72, dtype=dtype))
    with torch.no_grad():
        y = linear(x, weight, bias, "gelu")
    assert hopper == ["_linear_kernel"]
    assert_close(y, linear_reference(x.double(), weight.double(), bias.double(), "gelu"), 4e-3, 4e-3, "y")


def test_the_choice_times_the_hopper_kernel_too(monkeypatch, triton_backend, kernel_launches):
    """On sm_90 three candidates are timed and the fastest kept."""
    monkeypatch.setattr(gemm_choice, "_on_gpu", lambda tensor: True)
    monkeypatch.setattr(linear_hopper, "runs_on", lambda tensor: True)
    monkeypatch.setattr(gemm_choice, "_choices", type(gemm_choice._choices)())
    times = {"_linear_kernel": 3.0, "_linear_hopper_kernel": 1.0}

    def fake(run):
        before = len(kernel_launches)
        run()
        launched = kernel_launches[before:]
        return next((times[name] for name in launched if name in times), 2.0)  # cuBLAS: 2.0

    monkeypatch.setattr(gemm_choice, "_measure", fake)
    x, weight = torch.randn(48, 64).half(), torch.randn(32, 64).half()
    with torch.no_grad():
        y = linear(x, weight)
    (key, choice), = gemm_choice.choices().items()
    assert choice == gemm_choice.Choice("hopper", {"classic": 3.0, "hopper": 1.0, "cublas": 2.0})
    assert "hopper 1.000 ms" in gemm_choice.describe(key, choice)
    assert_close(y, linear_reference(x.double(), weight.double()), 4e-3, 4e-3, "y")


def test_the_report_compiles_what_the_hopper_kernel_launches(hopper, launch_arguments):
    """Every launch (forward with GELU and GeGLU, dx with act', dW with the bias gradient; token
    counts that are multiples of 16 and not; feature sizes multiples of 16) runs a specialisation
    that a report case compiles, as tests/test_report.py checks for the other kernels."""
    from test_report import _runtime_arguments, _specialisation

    from fastencoder.kernels import report

    for tokens in (64, 37):
        x, weight, bias = torch.randn(tokens, 64).half(), torch.randn(96, 64).half(), torch.randn(96).half()
        linear(leaf(x), leaf(weight), leaf(bias), "gelu").sum().backward()
        geglu_linear(leaf(x), leaf(weight)).sum().backward()
    cases = report.all_cases("linear hopper")
    kernel = cases[0]["fn"]
    runtime = _runtime_arguments(kernel)
    compiled = {(frozenset(a for a in case["constexprs"] if a in runtime), frozenset(case["divisible_by_16"]))
                for case in cases}
    launched = [arguments for name, arguments in launch_arguments if name == "_linear_hopper_kernel"]
    assert len(launched) == 12 and all(case["archs"] == ("sm_90a",) and case["tma"] for case in cases)
    for arguments in launched:
        integers = {a: arguments[a] for a in runtime if type(arguments[a]) is int}
        ones, divisible = _specialisation(kernel, integers)
        assert (frozenset(ones), frozenset(divisible)) in compiled, integers


@pytest.fixture
def forced_hopper():
    gemm_choice.force("hopper")
    yield
    gemm_choice.force(None)


# On an sm_90 GPU: BERT-base's and ModernBERT-base's FFN shapes in both 16-bit dtypes (bf16's tl.dot
# is wrong under the interpreter), every epilogue, forward and backward; K up to 3072: 4x the
# K=104 accumulation tolerance, as tests/test_linear.py's GPU cases.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation, with_residual", [(None, True), ("gelu", False), ("gelu_tanh", False)])
@pytest.mark.parametrize("shape", [(4096, 768, 3072), (1000, 3072, 768)])
def test_linear_on_hopper_gpu(device, triton_backend, forced_hopper, kernel_launches, dtype, activation,
                              with_residual, shape):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Hopper kernel runs on compute capability 9.x")
    m, k, n = shape
    x, weight = torch.randn(m, k).to(dtype), (torch.randn(n, k) / k**0.5).to(dtype)
    bias, residual = torch.randn(n).to(dtype), torch.randn(m, n).to(dtype) if with_residual else None
    atol, rtol = TOLERANCES[torch.float16]
    ours = [leaf(t) for t in (x, weight, bias)]
    theirs = float64_leaves(x, weight, bias)
    y = linear(*ours, activation, residual)
    expected = linear_reference(*theirs, activation, None if residual is None else residual.double())
    assert_close(y, expected, 4 * atol if dtype == torch.float16 else 3e-2, rtol, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy.double())
    for name, got, want in zip(("dx", "dweight", "dbias"), ours, theirs):
        assert_close(got.grad, want.grad, 4 * atol * want.grad.abs().max().item(), 3e-2, name)
    assert kernel_launches.count("_linear_hopper_kernel") == 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_geglu_on_hopper_gpu(device, triton_backend, forced_hopper, kernel_launches, dtype):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Hopper kernel runs on compute capability 9.x")
    x, weight = torch.randn(4096, 768).to(dtype), (torch.randn(2304, 768) / 768**0.5).to(dtype)
    ours, theirs = [leaf(x), leaf(weight)], float64_leaves(x, weight)
    y, expected = geglu_linear(*ours), geglu_linear_reference(*theirs)
    assert_close(y, expected, 1.6e-2 if dtype == torch.float16 else 3e-2, 3e-2, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy.double())
    for name, got, want in zip(("dx", "dweight"), ours, theirs):
        assert_close(got.grad, want.grad, 1.6e-2 * want.grad.abs().max().item(), 3e-2, name)
    assert kernel_launches.count("_linear_hopper_kernel") == 3
