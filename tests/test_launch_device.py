"""Every kernel launches on the device of its tensors and that device's current stream
(kernels/_launch.py). conftest.py checks each launch of the whole suite; these tests show that the
check can fail, that every kernel the package launches went through it, and (with two GPUs) that
ops and a model run on cuda:1 while cuda:0 is the current device."""
import pytest
import torch
import transformers

from fastencoder import models
from fastencoder.kernels import attention, layer_norm, linear, pad, report, unpad
from fastencoder.kernels._launch import launch_device, on_device_of
from fastencoder.kernels.attention.dropout import _draw_dropout_seed, _dropout_keep_mask
from fastencoder.kernels.layer_norm import _layer_norm_fwd_kernel
from test_bert import FP32_TOL, assert_same_grads, bert_config, ragged_batch, twin_models
from helpers import assert_close


def _launched_kernels():
    """Every kernel the package launches: those the static report compiles."""
    return {case["fn"].fn.__name__ for case in report.all_cases()}


def test_a_launch_outside_the_guard_is_caught(device, triton_backend):
    x = torch.randn(4, 16, device=device)
    stats = torch.empty(4, device=device)
    args = (x, x, x[0], x[0], torch.empty_like(x), stats, stats.clone(), 4, 16, 16, 16, 16, 1e-12)
    with pytest.raises(AssertionError, match="outside kernels/_launch.py's on_device_of"):
        _layer_norm_fwd_kernel[(1,)](*args, HAS_RESIDUAL=False, HAS_BIAS=True, BLOCK_M=4, BLOCK_N=16)
    with pytest.raises(AssertionError, match="with tensors on"):
        with on_device_of(torch.empty(0, device="meta")):
            _layer_norm_fwd_kernel[(1,)](*args, HAS_RESIDUAL=False, HAS_BIAS=True, BLOCK_M=4, BLOCK_N=16)
    assert launch_device() is None
    with on_device_of(x):
        _layer_norm_fwd_kernel[(1,)](*args, HAS_RESIDUAL=False, HAS_BIAS=True, BLOCK_M=4, BLOCK_N=16)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gradient_checkpointing_enable's new name
def test_every_kernel_launches_on_its_tensors_device(device, triton_backend, kernel_launches):
    """A padded and a padding-free training step with dropout (and gradient checkpointing, which
    recomputes under autograd), the dropout mask and a windowed attention with rotary embeddings
    launch every kernel of the package; each launch was checked by conftest.py to run inside the
    guard, on its tensors' device."""
    config = bert_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = models.BertModel(config).train()
    model.gradient_checkpointing_enable()
    batch = ragged_batch(config)
    for unpad_option in (False, True):
        model.unpad = unpad_option
        output = model(**batch)
        (output.last_hidden_state.sum() + output.pooler_output.sum()).backward()
    _dropout_keep_mask(_draw_dropout_seed(), 1, 2, 5, 0.5, device)
    # ModernBERT's attention: a sliding window and rotary embeddings, inside the same kernels
    qkv = torch.randn(2, 20, 3, 2, 16, device=device, requires_grad=True)
    rotary = tuple(torch.randn(20, 16, device=device) for _ in range(2))
    attention(*qkv.unbind(2), window=3, rotary=rotary).sum().backward()
    # the GEMM's other candidates run only where kernels/gemm_choice.py times them: on CUDA devices,
    # the Hopper kernel on sm_90 and later
    not_here = set() if device.type == "cuda" else {"_epilogue_kernel", "_linear_hopper_kernel"}
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        not_here.add("_linear_hopper_kernel")
    assert set(kernel_launches) == _launched_kernels() - not_here


# With two GPUs: the ops and a model on cuda:1 while cuda:0 is the current device, on a side stream
# of cuda:1, give what the same calls give on cuda:0.
def _every_op(device):
    torch.manual_seed(0)
    x = torch.randn(37, 64, device=device, requires_grad=True)
    weight = torch.randn(48, 64, device=device, requires_grad=True)
    bias = torch.randn(48, device=device, requires_grad=True)
    h = linear(x, weight, bias, "gelu")
    h = layer_norm(h, torch.ones(48, device=device), bias, 1e-12, residual=h)
    qkv = h[:36].reshape(2, 18, 3, 1, 16).unbind(2)
    mask = torch.arange(18, device=device)[None, :] < torch.tensor([[18], [7]], device=device)
    rotary = tuple(torch.randn(18, 16, device=device) for _ in range(2))
    out = attention(*qkv, key_padding_mask=mask) + attention(*qkv, key_padding_mask=mask, window=4, rotary=rotary)
    indices = mask.flatten().nonzero()[:, 0]
    out = pad(unpad(out, indices), indices, 2, 18)
    out.square().sum().backward()
    return [out.detach(), x.grad, weight.grad, bias.grad]


@pytest.mark.gpu
def test_ops_run_on_the_second_gpu(triton_backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    expected = _every_op(torch.device("cuda:0"))
    with torch.cuda.device(0):
        side = torch.cuda.Stream(device="cuda:1")
        with torch.cuda.stream(side):
            found = _every_op(torch.device("cuda:1"))
        side.synchronize()
        assert torch.cuda.current_device() == 0
    for got, want in zip(found, expected):
        assert got.device == torch.device("cuda:1")
        torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_model_runs_on_the_second_gpu(triton_backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    config = bert_config()
    with torch.device("cpu"):
        reference, ours = twin_models(transformers.BertModel, models.BertModel, config)
        batch = ragged_batch(config)
    ours.to("cuda:1").train()
    reference.train()
    with torch.cuda.device(0):
        output = ours(**{name: value.to("cuda:1") for name, value in batch.items()})
        output.last_hidden_state.sum().backward()
    expected = reference(**batch)
    expected.last_hidden_state.sum().backward()
    assert_close(output.last_hidden_state.cpu(), expected.last_hidden_state, FP32_TOL, FP32_TOL, "cuda:1")
    assert_same_grads(ours.cpu(), reference)
