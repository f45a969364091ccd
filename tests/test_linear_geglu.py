"""geglu_linear: act(x · W[:I]ᵀ + b[:I]) · (x · W[I:]ᵀ + b[I:]), as Hugging Face's ModernBertMLP
computes it, on both paths, against a float64 reference, forward and backward."""
import importlib

import pytest
import torch
from transformers import ModernBertConfig
from transformers.models.modernbert.modeling_modernbert import ModernBertMLP

from fastencoder.kernels.linear import geglu_linear, geglu_linear_reference, geglu_linear_torch
from helpers import assert_close, float64_leaves, leaf

linear_module = importlib.import_module("fastencoder.kernels.linear")
kernel_module = importlib.import_module("fastencoder.kernels.linear_kernel")

# As tests/test_linear.py: inputs rounded to the dtype, the reference in float64 on those values.
# Over K <= 100 terms, fp32 accumulation errs by ~1e-6; 16-bit outputs round once (fp16 2^-11,
# bf16 2^-8 relative). The gradients go through the rounded factors F and dh (two more roundings).
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
ACTIVATIONS = [None, "gelu", "gelu_tanh", "relu"]


def _inputs(m, k, intermediate, dtype, device="cpu", bias=True):
    x = torch.randn(m, k, device=device).to(dtype)
    weight = (torch.randn(2 * intermediate, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(2 * intermediate, device=device).to(dtype) if bias else None
    return x, weight, b


def _check(x, weight, bias, activation, dtype, grad_scale=1.0):
    """geglu_linear and its gradients (x, weight, bias) against float64; returns the output."""
    atol, rtol = TOLERANCES[dtype]
    inputs = [None if t is None else leaf(t) for t in (x, weight, bias)]
    y = geglu_linear(*inputs, activation=activation)
    reference = float64_leaves(x, weight, bias)
    expected = geglu_linear_reference(*reference, activation=activation)
    assert y.shape == expected.shape == (*x.shape[:-1], weight.shape[0] // 2) and y.dtype == dtype
    assert_close(y, expected, atol, rtol, "y")
    dy = torch.randn_like(y) * grad_scale
    y.backward(dy)
    expected.backward(dy.double())
    for name, got, want in zip(("dx", "dweight", "dbias"), inputs, reference):
        if got is not None:
            assert_close(got.grad, want.grad, atol * max(1.0, want.grad.abs().max().item()), rtol, name)
    return y


def test_is_hugging_face_modernbert_mlp():
    """ModernBertMLP's Wo(act(input) * gate) with `input, gate = Wi(x).chunk(2, -1)`: the same
    values, bit for bit, when Wo is applied to geglu_linear(x, Wi.weight, Wi.bias); its default
    hidden_activation "gelu" is the erf GELU."""
    config = ModernBertConfig(hidden_size=64, intermediate_size=96, mlp_bias=True, mlp_dropout=0.0)
    assert config.hidden_activation == "gelu"
    mlp = ModernBertMLP(config).eval()
    x = torch.randn(3, 11, 64)
    with torch.no_grad():
        ours = mlp.Wo(geglu_linear(x, mlp.Wi.weight, mlp.Wi.bias))
        assert torch.equal(ours, mlp(x))
        tanh = mlp.Wo(geglu_linear(x, mlp.Wi.weight, mlp.Wi.bias, activation="gelu_tanh"))
        assert (tanh - mlp(x)).abs().max() > 1e-6


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_grad", [False, True])
def test_torch_path_matches_float64(torch_backend, kernel_launches, activation, with_grad):
    """Without autograd the activation and the gate are applied in place on the GEMM's output
    (a view of it, rows 2·I apart); inputs untouched either way. fp32, real-model-sized shapes."""
    x, weight, bias = _inputs(37, 96, 80, torch.float32)
    before = [t.clone() for t in (x, weight, bias)]
    if with_grad:
        _check(x, weight, bias, activation, torch.float32)
    else:
        y = geglu_linear(x, weight, bias, activation)
        assert y.stride() == (160, 1)
        assert_close(y, geglu_linear_reference(x.double(), weight.double(), bias.double(), activation),
                     *TOLERANCES[torch.float32], "y")
    assert all(torch.equal(t, b) for t, b in zip((x, weight, bias), before))
    assert kernel_launches == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_torch_path_error_at_most_twice_hugging_faces(torch_backend, dtype, seed, scale):
    """The error rule: against the fp32 computation, at most twice Hugging Face's own error in the
    same dtype, over seeds and weight scales (the in-place path rounds as HF's does)."""
    torch.manual_seed(seed)
    x, weight, bias = _inputs(64, 128, 96, torch.float32)
    weight = weight * scale
    exact = geglu_linear_reference(x, weight, bias)
    low = [t.to(dtype) for t in (x, weight, bias)]
    with torch.no_grad():
        ours = (geglu_linear(*low).float() - exact).abs().max()
    hf = (geglu_linear_reference(*low).float() - exact).abs().max()
    assert ours <= 2 * hf


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_path_gradients_in_16_bit(torch_backend, dtype):
    x, weight, bias = _inputs(37, 96, 80, dtype)
    _check(x, weight, bias, "gelu", dtype)


def test_the_torch_path_function_is_what_the_op_runs(torch_backend):
    x, weight, bias = _inputs(12, 16, 8, torch.float32)
    assert torch.equal(geglu_linear(x, weight, bias), geglu_linear_torch(x, weight, bias))


# M=37, K=100, I=35 (N = 70) cross the interpreter's 32×32×32 tile on every edge, ragged last tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_backend_matches_float64(dtype, activation, device, triton_backend, poisoned_allocations,
                                        kernel_launches):
    x, weight, bias = _inputs(37, 100, 35, dtype, device)
    _check(x, weight, bias, activation, dtype)
    # the fused GeGLU forward, then the dx and dW products on dh = [dy | dy] ⊙ F
    assert kernel_launches == ["_linear_kernel"] * 3


def test_triton_backend_without_bias_3d_and_frozen_weight(device, triton_backend):
    x, weight, _ = _inputs(2 * 19, 64, 24, torch.float32, device, bias=False)
    _check(x.view(2, 19, 64), weight, None, "gelu", torch.float32)
    frozen = leaf(x)
    geglu_linear(frozen, weight).square().sum().backward()
    reference = frozen.detach().double().requires_grad_()
    geglu_linear_reference(reference, weight.double()).square().sum().backward()
    assert_close(frozen.grad, reference.grad, 1e-4, 2e-5, "dx")


def test_traceable_by_torch_compile(device, triton_backend):
    x, weight, bias = _inputs(37, 100, 35, torch.float32, device)
    compiled = torch.compile(lambda *a: geglu_linear(*a), fullgraph=True, backend="aot_eager")
    expected = geglu_linear_reference(x.double(), weight.double(), bias.double())
    assert_close(compiled(x, weight, bias), expected, 2e-5, 2e-5, "compiled")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(device, triton_backend, dtype, with_bias):
    x, weight, bias = _inputs(37, 40, 12, dtype, device, bias=with_bias)
    x3 = torch.randn(40, 2, 18, device=device).to(dtype).permute(1, 2, 0)  # a permuted [2, 18, 40]
    grad = lambda t: None if t is None else t.clone().requires_grad_()
    torch.library.opcheck(linear_module._geglu_fwd, (grad(x), grad(weight), grad(bias), 1, True))
    torch.library.opcheck(linear_module._geglu_fwd, (x3, weight, bias, 2, False))
    _, factors = linear_module._geglu_fwd(x, weight, bias, 1, True)
    dy = torch.randn(37, 12, device=device).to(dtype)
    torch.library.opcheck(linear_module._geglu_bwd, (dy, x, weight, factors, True, True, with_bias))
    torch.library.opcheck(linear_module._geglu_bwd, (dy, x, weight, factors, False, True, False))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(weight=torch.ones(69, 100)), ValueError, "even number of rows"),
        (dict(weight=torch.ones(70, 99)), ValueError, "in_features 99"),
        (dict(bias=torch.ones(35)), ValueError, "bias must have shape"),
        (dict(activation="swish"), ValueError, "activation must be one of"),
        (dict(x=torch.ones(37, 100, dtype=torch.int32)), TypeError, "x must be float16, bfloat16 or float32"),
        (dict(weight=torch.ones(70, 100, dtype=torch.float16)), TypeError, "weight is torch.float16"),
    ],
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_input_is_refused_before_launch(change, error, message, backend, kernel_launches):
    import fastencoder

    args = dict(x=torch.ones(37, 100), weight=torch.ones(70, 100), bias=torch.ones(70), activation="gelu")
    args.update(change)
    previous = fastencoder.get_backend()
    fastencoder.set_backend(backend)
    try:
        with pytest.raises(error, match=message):
            geglu_linear(**args)
    finally:
        fastencoder.set_backend(previous)
    assert kernel_launches == []


def test_the_report_compiles_what_geglu_launches(device, triton_backend, launch_arguments):
    """As tests/test_report.py checks for the other ops: every launch of the GeGLU forward and its
    dx and dW products, at token counts that are multiples of 16 and not, runs a specialisation
    (integers compiled as 1, integers known divisible by 16) that a report case of the kernel
    compiles, and the report has GeGLU cases. Feature sizes are multiples of 128, as BERT's and
    ModernBERT's are (others have operands copied to another orientation, see _matmul)."""
    from test_report import _runtime_arguments, _specialisation

    from fastencoder.kernels import report

    for tokens in (64, 37):
        for bias in (False, True):
            x, weight, b = _inputs(tokens, 128, 64, torch.float32, device, bias=bias)
            geglu_linear(leaf(x), leaf(weight), None if b is None else leaf(b)).sum().backward()
    cases = [case for case in report.all_cases("linear ") if case["fn"].fn.__name__ == "_linear_kernel"]
    assert any(case["constexprs"]["GLU"] for case in cases)
    kernel = cases[0]["fn"]
    runtime = _runtime_arguments(kernel)
    compiled = {(frozenset(a for a in case["constexprs"] if a in runtime), frozenset(case["divisible_by_16"]))
                for case in cases}
    assert len(launch_arguments) == 12
    for name, arguments in launch_arguments:
        assert name == "_linear_kernel"
        integers = {a: arguments[a] for a in runtime if type(arguments[a]) is int}
        ones, divisible = _specialisation(kernel, integers)
        assert (frozenset(ones), frozenset(divisible)) in compiled, integers


# On a GPU: ModernBERT-base's Wi (768 -> 2 x 1152) and ModernBERT-large's (1024 -> 2 x 2624) in both
# 16-bit dtypes (bf16's tl.dot is wrong under the interpreter), forward and backward, a ragged token
# count included; K up to 1024: 4x the K=100 accumulation tolerance, as tests/test_linear.py's.
GPU_SHAPES = [(4096, 768, 1152), (1000, 1024, 2624)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_modernbert_shapes_on_gpu(dtype, shape, device, triton_backend):
    x, weight, _ = _inputs(*shape, dtype, device, bias=False)
    atol, rtol = TOLERANCES[dtype]
    inputs = [leaf(x), leaf(weight)]
    y = geglu_linear(*inputs)
    reference = float64_leaves(x, weight)
    expected = geglu_linear_reference(*reference)
    assert_close(y, expected, 4 * atol, rtol, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy.double())
    for name, got, want in zip(("dx", "dweight"), inputs, reference):
        assert_close(got.grad, want.grad, 4 * atol * want.grad.abs().max().item(), rtol, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, config", [
    pytest.param(dtype, config, id=f"{name}-{'x'.join(map(str, config.kwargs.values()))}-w{config.num_warps}s{config.num_stages}")
    for dtype, name, configs in ((torch.float16, "fp16", kernel_module.CONFIGS_16BIT),
                                 (torch.float32, "fp32", kernel_module.CONFIGS_FP32))
    for config in configs])
def test_every_autotune_config_on_gpu(dtype, config, device, triton_backend, monkeypatch):
    """Every config, not only the tuner's pick: M = 300 and I = 100 leave ragged tiles in all."""
    monkeypatch.setitem(kernel_module._KERNELS, dtype, kernel_module._autotuned([config]))
    x, weight, bias = _inputs(300, 256, 100, dtype, device)
    _check(x, weight, bias, "gelu", dtype)
