"""Linear (+bias, GELU/ReLU, residual) kernels against a float64 reference, forward and backward."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from fastencoder.kernels import linear
from fastencoder.kernels.linear import linear_reference
from helpers import assert_close, float64_leaves, leaf

linear_module = importlib.import_module("fastencoder.kernels.linear")  # the module, not the op of that name
kernel_module = importlib.import_module("fastencoder.kernels.linear_kernel")

# Inputs are rounded to the dtype first and the reference runs in fp64 on those values, so the error
# is fp32 accumulation over K ≤ 100 terms plus one rounding of each output (fp16 2^-11, bf16 2^-8
# relative); dx and dW are themselves products of rounded fp16 intermediates (dh), hence rtol 4e-3.
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
ACTIVATIONS = [None, "gelu", "gelu_tanh", "relu"]


def _inputs(m, k, n, dtype, device):
    x = torch.randn(m, k, device=device).to(dtype)
    weight = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    residual = torch.randn(m, n, device=device).to(dtype)
    return x, weight, bias, residual


def _check(x, weight, bias, residual, activation, dtype):
    atol, rtol = TOLERANCES[dtype]
    inputs = [None if t is None else leaf(t) for t in (x, weight, bias, residual)]
    y = linear(inputs[0], inputs[1], inputs[2], activation, inputs[3])
    reference_inputs = float64_leaves(x, weight, bias, residual)
    expected = linear_reference(*reference_inputs[:3], activation, reference_inputs[3])
    assert y.shape == expected.shape and y.dtype == dtype
    assert_close(y, expected, atol, rtol, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy.double())
    for name, got, want in zip(("dx", "dweight", "dbias", "dresidual"), inputs, reference_inputs):
        if got is not None:
            assert_close(got.grad, want.grad, atol * max(1.0, want.grad.abs().max().item()), rtol, name)


# M=37, K=100, N=70 cross the interpreter's 32×32×32 tile on every edge, with ragged last tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_float64_reference(dtype, activation, device, triton_backend, kernel_launches, poisoned_allocations):
    x, weight, bias, residual = _inputs(37, 100, 70, dtype, device)
    _check(x, weight, bias, residual if activation is None else None, activation, dtype)
    # forward, then the dx and dW products of the backward
    assert kernel_launches.count("_linear_kernel") == 3


@pytest.mark.parametrize("activation", ["gelu", None])
def test_residual_bias_and_3d_input(activation, device, triton_backend):
    x, weight, bias, residual = _inputs(2 * 19, 64, 48, torch.float32, device)
    _check(x.view(2, 19, 64), weight, None, residual.view(2, 19, 48), activation, torch.float32)


@pytest.mark.parametrize("out_features, in_features", [(70, 100), (128, 256), (1, 3)])
def test_no_operand_runs_along_a_ragged_m_or_n_with_unit_stride(out_features, in_features, device, triton_backend,
                                                                 monkeypatch):
    """The kernel vectorises loads along a unit stride and wraps the last M / N tile around: an
    operand with unit stride along M or N must have that extent a multiple of every tile (128),
    or the loads would reach past its end. The backward's transposed views (dhᵀ, W, x) are the
    ones at risk, and act'(h) when out_features is 1; odd sizes get them copied into the other
    orientation."""
    launches = []

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                named = dict(zip(self.kernel.arg_names, args), **kwargs)
                launches.append((named["M"], named["N"], named["stride_am"], named["stride_bn"],
                                 named["stride_gm"] if named["SCALE_A"] else None))
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kernel_module, "_KERNELS", {dtype: Recording(kernel) for dtype, kernel in kernel_module._KERNELS.items()})
    x, weight, bias, _ = _inputs(37, in_features, out_features, torch.float32, device)
    _check(x, weight, bias, None, "gelu", torch.float32)
    assert len(launches) == 3  # forward, dx, dW
    for m, n, stride_am, stride_bn, stride_gm in launches:  # stride_gm: act'(h), read along M like A
        assert stride_am != 1 or m % 128 == 0, launches
        assert stride_bn != 1 or n % 128 == 0, launches
        assert stride_gm != 1 or m % 128 == 0, launches


class _TuningKeys:
    """Stands in for the autotuned kernels: records, per GEMM (forward, dx, dW), the key the
    autotuner would look its tuned config up by, and launches nothing."""

    def __init__(self, tuned):
        self.tuned, self.keys = tuned, {}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.tuned.arg_names, args), **kwargs)
            gemm = "dW" if named["ROWSUM_A"] else ("dx" if named["SCALE_A"] else "forward")
            self.keys.setdefault(gemm, set()).add(tuple(named[key] for key in self.tuned.keys))
        return launch


def test_autotune_keys_are_bounded_over_token_counts(monkeypatch):
    """Token counts 1…20000 (M of the forward and dx products, K of the dW product) map to at most
    11 keys per GEMM, so that new batch shapes do not each start a tuning run (~0.5 s per weight
    shape on a GPU). The launches are the op's own forward and backward, run for token counts
    covering every bucket (both ends of each, and every 97th count): each GEMM's key depends on the
    token count through its bucket alone."""
    keys = _TuningKeys(kernel_module._KERNELS[torch.float16])
    monkeypatch.setattr(kernel_module, "_KERNELS", {torch.float16: keys})
    weight, bias = torch.empty(48, 32, dtype=torch.float16), torch.empty(48, dtype=torch.float16)
    counts = set(range(1, 20001, 97)) | {20000}
    counts |= {edge + offset for power in range(15) for edge in [2**power] for offset in (0, 1) if edge + offset <= 20000}
    buckets = {}
    for tokens in sorted(counts):
        keys.keys.clear()
        x = torch.empty(tokens, 32, dtype=torch.float16)
        _, act_grad = linear_module._linear_fwd(x, weight, bias, 1, None, True)
        linear_module._linear_bwd(torch.empty(tokens, 48, dtype=torch.float16), x, weight, act_grad,
                                  True, True, True)
        found = {gemm: seen.pop() for gemm, seen in keys.keys.items()}
        assert set(found) == {"forward", "dx", "dW"}
        assert buckets.setdefault(kernel_module._bucket(tokens), found) == found, tokens
    assert set(buckets) == {kernel_module._bucket(tokens) for tokens in range(1, 20001)}
    assert len(buckets) <= 11  # powers of two 16 … 16384


def test_the_two_cta_config_is_tried_only_where_registers_allow_two_ctas(monkeypatch):
    """TWO_CTAS_128X128 (3 stages: two CTAs per SM on sm_90a if the kernel stays within 128
    registers) is among the configs the autotuner tries for the forward that stores no act' and for
    the plain dx and dW products, and not for the epilogues above 128 registers (act' stored or
    applied, bias gradient reduced). The launches are the op's own; the report checks the two CTAs."""
    arg_names = kernel_module._KERNELS[torch.float16].arg_names
    launches = []

    class Recording:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(dict(zip(arg_names, args), **kwargs))

    monkeypatch.setattr(kernel_module, "_KERNELS", {torch.float16: Recording()})
    x, dy = torch.empty(64, 32, dtype=torch.float16), torch.empty(64, 48, dtype=torch.float16)
    weight, bias = torch.empty(48, 32, dtype=torch.float16), torch.empty(48, dtype=torch.float16)
    linear_module._linear_fwd(x, weight, bias, 1, None, False)  # inference, erf GELU
    _, act_grad = linear_module._linear_fwd(x, weight, bias, 1, None, True)  # training, erf GELU
    linear_module._linear_bwd(dy, x, weight, act_grad, True, True, True)  # dx applying act', dW + db
    linear_module._linear_bwd(dy, x, weight, None, True, True, False)  # dx, dW without db
    tried = [kernel_module.TWO_CTAS_128X128 in kernel_module._configs_for_variant(kernel_module.CONFIGS_16BIT, named)
             for named in launches]
    assert tried == [True, False, False, False, True, True]
    # the other configs are tried by every variant
    assert all(len(kernel_module._configs_for_variant(kernel_module.CONFIGS_16BIT, named))
               >= len(kernel_module.CONFIGS_16BIT) - 1 for named in launches)


@pytest.mark.parametrize("tokens", [33, 61])  # both in the bucket of 64
def test_results_do_not_depend_on_the_bucket(tokens, device, triton_backend):
    """The kernel bounds its loops and stores with the exact sizes: two token counts that share
    every autotune key (and so a tuned config) both give the reference's result and gradients."""
    x, weight, bias, _ = _inputs(tokens, 40, 24, torch.float32, device)
    _check(x, weight, bias, None, "gelu", torch.float32)


def test_operands_spanning_2_31_elements_are_refused(device, triton_backend, kernel_launches):
    """The kernel's offsets are 32-bit: what counts is how far apart an operand's elements lie, not
    how many there are (2 rows 2**31 elements apart). torch.empty leaves the 4 GB untouched."""
    storage = torch.empty(2**31 + 8, dtype=torch.float16, device=device)
    x = storage.as_strided((2, 8), (2**31, 1))
    with pytest.raises(ValueError, match="span < 2\\*\\*31 elements"):
        linear(x, torch.ones(4, 8, dtype=torch.float16, device=device))
    assert kernel_launches == []


def test_non_contiguous_input(device, triton_backend):
    x, weight, bias, _ = _inputs(37, 100, 70, torch.float32, device)
    strided = torch.randn(100, 37, device=device).t()  # column stride 37
    sliced = torch.randn(37, 200, device=device)[:, ::2]
    for operand in (strided, sliced):
        _check(operand, weight, bias, None, "gelu", torch.float32)


def test_frozen_weight_only_input_gradient(device, triton_backend, kernel_launches):
    x, weight, bias, _ = _inputs(37, 100, 70, torch.float32, device)
    x = leaf(x)
    linear(x, weight, bias, "gelu").sum().backward()
    reference_x = x.detach().double().requires_grad_()
    linear_reference(reference_x, weight.double(), bias.double(), "gelu").sum().backward()
    assert_close(x.grad, reference_x.grad, 2e-5, 2e-5, "dx")
    assert kernel_launches.count("_linear_kernel") == 2  # no dW product for a frozen weight


def test_gradient_of_weight_alone_under_gelu(device, triton_backend):
    x, weight, bias, _ = _inputs(37, 100, 70, torch.float32, device)
    weight = leaf(weight)
    linear(x, weight, bias, "gelu").square().sum().backward()
    reference_weight = weight.detach().double().requires_grad_()
    linear_reference(x.double(), reference_weight, bias.double(), "gelu").square().sum().backward()
    assert_close(weight.grad, reference_weight.grad, 1e-4, 2e-5, "dweight")


def test_gelu_flavours_follow_hugging_face():
    # BERT's hidden_act="gelu" is the erf GELU, ALBERT's "gelu_new" the tanh approximation
    h = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    eye = torch.eye(1, dtype=torch.float64)
    as_linear = lambda activation: linear_reference(h[:, None], eye, None, activation)[:, 0]
    torch.testing.assert_close(as_linear("gelu"), ACT2FN["gelu"](h))
    torch.testing.assert_close(as_linear("gelu_tanh"), ACT2FN["gelu_new"](h))
    assert (as_linear("gelu") - as_linear("gelu_tanh")).abs().max() > 1e-4


def test_kernel_gelu_is_erf_not_tanh(device, triton_backend):
    x, weight, bias, _ = _inputs(37, 100, 70, torch.float32, device)
    y = linear(3 * x, weight, bias, "gelu")
    erf = F.gelu(F.linear(3 * x.double(), weight.double(), bias.double()))
    tanh = F.gelu(F.linear(3 * x.double(), weight.double(), bias.double()), approximate="tanh")
    assert (y.double() - erf).abs().max() < 1e-5 < (y.double() - tanh).abs().max()


def test_traceable_by_torch_compile(device, triton_backend):
    x, weight, bias, residual = _inputs(37, 100, 70, torch.float32, device)
    compiled = torch.compile(lambda *a: linear(*a, activation="gelu"), fullgraph=True, backend="aot_eager")
    expected = linear_reference(x.double(), weight.double(), bias.double(), "gelu")
    assert_close(compiled(x, weight, bias), expected, 2e-5, 2e-5, "compiled")


# On a GPU: every BERT-family GEMM shape with BERT's GELU in both 16-bit dtypes (bf16's tl.dot is
# wrong under the interpreter), the other epilogues once. Each (variant, dtype, config) compiles
# anew and the GPU check's time is short, hence not the full product.
GPU_SHAPES = [(4096, 768, 3072), (4096, 3072, 768), (127, 768, 2304), (300, 128, 768)]
GPU_CASES = ([(dtype, "gelu", shape) for dtype in (torch.bfloat16, torch.float16) for shape in GPU_SHAPES]
             + [(torch.float16, activation, GPU_SHAPES[0]) for activation in (None, "gelu_tanh", "relu")])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, activation, shape", GPU_CASES)
def test_bert_shapes_on_gpu(dtype, activation, shape, device, triton_backend):
    x, weight, bias, residual = _inputs(*shape, dtype, device)
    atol, rtol = TOLERANCES[dtype]
    y = linear(x, weight, bias, activation, residual)
    expected = linear_reference(x.double(), weight.double(), bias.double(), activation, residual.double())
    assert_close(y, expected, atol * 4, rtol, "y")  # K up to 3072: 4× the K=100 accumulation error


# Every autotune configuration, not only the tuner's pick, with the epilogues the models launch:
# the forward with a bias and no activation, erf or tanh GELU (storing act' for the backward), the
# dx product applying act', the dW product reducing the bias gradient. M = 300 and N = 200 leave
# ragged last tiles in every configuration.
EVERY_CONFIG = [pytest.param(dtype, config, id=f"{name}-{'x'.join(map(str, config.kwargs.values()))}"
                             f"-w{config.num_warps}s{config.num_stages}")
                for dtype, name, configs in ((torch.float16, "fp16", kernel_module.CONFIGS_16BIT),
                                             (torch.bfloat16, "bf16", kernel_module.CONFIGS_16BIT),
                                             (torch.float32, "fp32", kernel_module.CONFIGS_FP32))
                for config in configs]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, config", EVERY_CONFIG)
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
def test_every_autotune_config_on_gpu(dtype, config, activation, device, triton_backend, monkeypatch):
    monkeypatch.setitem(kernel_module._KERNELS, dtype, kernel_module._autotuned([config]))
    x, weight, bias, _ = _inputs(300, 256, 200, dtype, device)
    _check(x, weight, bias, None, activation, dtype)


@pytest.mark.gpu
def test_bf16_backward_on_gpu(device, triton_backend):
    """The dx (GELU' applied in its prologue) and dW (+ bias gradient) products in bf16, at BERT's
    FFN shape. _check scales the gradients' atol by their magnitude: 3e-2 of the largest gradient
    stays about 5x the expected error (bf16 rounding of dh and of the result, 2^-8 each)."""
    x, weight, bias, _ = _inputs(4096, 768, 3072, torch.bfloat16, device)
    _check(x, weight, bias, None, "gelu", torch.bfloat16)


@pytest.mark.gpu
def test_fp32_uses_tf32_only_when_allowed(device, triton_backend):
    x, weight, bias, _ = _inputs(512, 1024, 512, torch.float32, device)
    expected = linear_reference(x.double(), weight.double(), bias.double())
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = (linear(x, weight, bias).double() - expected).abs().max().item()
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = (linear(x, weight, bias).double() - expected).abs().max().item()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert exact < 1e-4 < tf32


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(weight=torch.ones(70, 99)), ValueError, "in_features 99"),
        (dict(weight=torch.ones(70)), ValueError, "weight must be 2-D"),
        (dict(bias=torch.ones(71)), ValueError, "bias must have shape"),
        (dict(residual=torch.ones(37, 71)), ValueError, "residual must have shape"),
        (dict(x=torch.ones(37, 100, dtype=torch.int32)), TypeError, "x must be float16, bfloat16 or float32"),
        (dict(weight=torch.ones(70, 100, dtype=torch.float16)), TypeError, "weight is torch.float16"),
        (dict(bias=torch.ones(70, device="meta")), ValueError, "bias is on meta"),
        (dict(activation="swish"), ValueError, "activation must be one of"),
    ],
)
def test_bad_input_is_refused_before_launch(change, error, message, triton_backend, kernel_launches):
    args = dict(x=torch.ones(37, 100), weight=torch.ones(70, 100), bias=None, activation=None, residual=None)
    args.update(change)
    with pytest.raises(error, match=message):
        linear(**args)
    assert kernel_launches == []
