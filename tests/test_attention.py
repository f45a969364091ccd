"""Fused attention: kernels against a float64 reference, both layouts, masks, bias, dropout.

Without a GPU the kernels run in Triton's interpreter (slow: ~1.5 ms per program), so shapes are
small (B=2, H=2) but cross every block edge: S=17 and 77 end mid-block, 129 spills one row into
an extra query block and an extra key block (fp16 takes 128-query, 64-key forward blocks; fp32
16- or 32-row blocks). tests/test_attention_lengths.py covers key padding masks run as lengths
and lengths at block edges.
"""
import contextlib
import importlib
import math

import pytest
import torch

from fastencoder import models
from fastencoder.kernels.attention import MAX_DROPOUT_SEQLEN, attention, attention_reference, attention_torch
from fastencoder.kernels.attention.dropout import _draw_dropout_seed, _dropout_keep_mask
from test_bert import bert_config, ragged_batch

FWD = "_attention_fwd_kernel"
BWD = ("_attention_bwd_delta_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel")

# Tolerances against the float64 reference computed from the very same (rounded) inputs.
# fp32: the kernels compute in fp32 (ieee dot products); over <= 129 keys of O(1) values the
#   rounding is ~1e-6 (measured <= 1e-5 on the gradients); 1e-4 keeps margin yet any masking or
#   indexing slip moves results by >= 1e-2.
# fp16: P and dS are rounded to fp16 (2^-11 relative) before their matmuls, and outputs are fp16;
#   the error of a sum over S terms grows like sqrt(S)·2^-11·|term|: ~5e-4 on out, a few 1e-3 on
#   dV, whose entries reach ~10. The error-ratio test below bounds fp16 more tightly, relative to
#   PyTorch's own fp16 attention.
TOLERANCES = {
    torch.float32: dict(out=(1e-4, 1e-4), grad=(1e-4, 1e-4)),
    torch.float16: dict(out=(2e-3, 2e-3), grad=(1e-2, 1e-2)),
    torch.bfloat16: dict(out=(1.6e-2, 1.6e-2), grad=(6e-2, 6e-2)),  # 2^-8 relative instead of 2^-11
}
# fp32 inputs with TF32 allowed: the dot products round their inputs to 10 mantissa bits (2^-11
# relative), as fp16 does, but P and the outputs stay fp32: fp16's tolerances hold with room.
TOLERANCES["tf32"] = TOLERANCES[torch.float16]


def _qkv(batch, seqlen, heads, head_dim, dtype, device):
    """A leaf [B, S, 3, H, D] tensor and q, k, v as strided views of it (a fused QKV projection)."""
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, device=device).to(dtype).requires_grad_()
    return qkv, qkv.unbind(2)


def _float64(value):
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _check_close(name, actual, expected, tolerance):
    atol, rtol = tolerance
    assert torch.isfinite(actual).all(), f"{name} has non-finite values"
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _check_against_float64(qkv, out, grad_out, dtype, dropout_mask=None, **kwargs):
    """out and qkv.grad (already computed from grad_out) against the float64 reference."""
    reference_qkv = qkv.detach().double().requires_grad_()
    reference_kwargs = {name: _float64(value) for name, value in kwargs.items()}
    if dropout_mask is not None:
        reference_kwargs["dropout_mask"] = dropout_mask
    q, k, v = reference_qkv.unbind(-3)
    expected = attention_reference(q, k, v, **reference_kwargs)
    expected.backward(grad_out.double())
    _check_close("out", out, expected, TOLERANCES[dtype]["out"])
    for index, name in enumerate(("dq", "dk", "dv")):
        _check_close(name, qkv.grad.select(-3, index), reference_qkv.grad.select(-3, index),
                     TOLERANCES[dtype]["grad"])


def _lengths_mask(lengths, seqlen, left_padding, device):
    positions = torch.arange(seqlen, device=device)[None, :]
    lengths = torch.tensor(lengths, device=device)[:, None]
    return positions >= seqlen - lengths if left_padding else positions < lengths


def _run_padded(device, dtype, seqlen, head_dim, lengths=None, left_padding=False, bias_kind=None,
                dropout_p=0.0):
    batch, heads = 2, 2
    qkv, (q, k, v) = _qkv(batch, seqlen, heads, head_dim, dtype, device)
    kwargs = dict(dropout_p=dropout_p)
    if lengths is not None:
        kwargs["key_padding_mask"] = _lengths_mask(lengths, seqlen, left_padding, device)
    if bias_kind == "full":  # per head, with a query row that sees no key and one of finfo.min
        bias = torch.randn(batch, heads, seqlen, seqlen, device=device).to(dtype)
        bias[0, 1, seqlen // 2, :] = float("-inf")
        bias[0, 0, 0, :] = torch.finfo(dtype).min  # HF's "masked": finite, so a uniform average
        bias[1, 1, :, 0] = float("-inf")
        kwargs["bias"] = bias
    elif bias_kind == "broadcast":  # an HF-style extended mask [B, 1, 1, S]
        bias = torch.zeros(batch, 1, 1, seqlen, device=device, dtype=dtype)
        bias[0, ..., seqlen // 3:] = torch.finfo(dtype).min
        kwargs["bias"] = bias
    out = attention(q, k, v, **kwargs)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    return qkv, out, grad_out, kwargs


PADDED_CASES = [
    # dtype, S, D, key lengths, left padding, bias
    pytest.param(torch.float32, 1, 32, None, False, None, id="fp32-S1"),
    pytest.param(torch.float32, 17, 64, [17, 1], False, None, id="fp32-S17-right-padding-len1"),
    pytest.param(torch.float32, 129, 32, [100, 0], True, "full", id="fp32-S129-left-padding-masked-seq-bias"),
    pytest.param(torch.float32, 77, 80, None, False, "broadcast", id="fp32-S77-D80-hf-bias"),
    pytest.param(torch.float16, 129, 64, [129, 1], False, "full", id="fp16-S129-right-padding-bias"),
    pytest.param(torch.float16, 77, 80, [40, 77], True, None, id="fp16-S77-D80-left-padding"),
]


@pytest.mark.parametrize("dtype, seqlen, head_dim, lengths, left_padding, bias_kind", PADDED_CASES)
def test_padded_matches_float64(device, triton_backend, kernel_launches, poisoned_allocations, dtype,
                                seqlen, head_dim, lengths, left_padding, bias_kind):
    qkv, out, grad_out, kwargs = _run_padded(device, dtype, seqlen, head_dim, lengths, left_padding,
                                             bias_kind)
    assert kernel_launches.count(FWD) == 1 and all(name in kernel_launches for name in BWD)
    _check_against_float64(qkv, out, grad_out, dtype, **kwargs)
    if lengths is not None and 0 in lengths:  # a sequence with no real key: zeros, finite grads
        assert (out[lengths.index(0)] == 0).all()
    if bias_kind == "full":  # a query row whose bias is -inf for every key: zeros too
        assert (out[0, seqlen // 2, 1] == 0).all()


def _packed(padded, lengths):
    return torch.cat([padded[b, :length] for b, length in enumerate(lengths)])


def _cu_seqlens(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


@pytest.mark.parametrize("dtype, head_dim", [(torch.float32, 64), (torch.float16, 32)])
def test_packed_matches_float64_and_padded(device, triton_backend, kernel_launches, poisoned_allocations,
                                           dtype, head_dim):
    # 70 ends mid-block (fp16: in the single 128-key block; fp32: after two 32-row blocks); an
    # empty sequence too
    lengths, heads = [1, 0, 70, 17], 2
    max_seqlen = max(lengths)
    qkv, (q, k, v) = _qkv(len(lengths), max_seqlen, heads, head_dim, dtype, device)
    packed_qkv = _packed(qkv.detach(), lengths).requires_grad_()
    pq, pk, pv = packed_qkv.unbind(1)
    cu_seqlens = _cu_seqlens(lengths, device)
    out = attention(pq, pk, pv, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert kernel_launches.count(FWD) == 1 and all(name in kernel_launches for name in BWD)
    _check_against_float64(packed_qkv, out, grad_out, dtype, cu_seqlens=cu_seqlens,
                           max_seqlen=max_seqlen)

    # the padded layout with a key padding mask gives the same numbers on the real tokens
    padded_out = attention(q, k, v, key_padding_mask=_lengths_mask(lengths, max_seqlen, False, device))
    padded_grad = torch.zeros_like(padded_out)
    start = 0
    for b, length in enumerate(lengths):
        padded_grad[b, :length] = grad_out[start:start + length]
        start += length
    padded_out.backward(padded_grad)
    torch.testing.assert_close(_packed(padded_out, lengths), out, atol=0, rtol=0)
    torch.testing.assert_close(_packed(qkv.grad, lengths), packed_qkv.grad, **dict(zip(
        ("atol", "rtol"), TOLERANCES[dtype]["grad"])))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_more_sequences_x_heads_than_the_grid_takes_run_in_chunks(device, triton_backend, kernel_launches,
                                                                  poisoned_allocations, monkeypatch, layout):
    """CUDA's grid y axis (sequences x heads) holds 65535 blocks; beyond, the op runs in chunks of
    sequences. The limit shrunk to 5 (2 heads: 2 sequences a chunk) shows 5 sequences in 3 chunks
    giving the float64 reference's outputs and gradients, a per-sequence bias sliced along."""
    monkeypatch.setattr(importlib.import_module("fastencoder.kernels.attention.op"), "MAX_BATCH_HEADS", 5)
    lengths, heads, head_dim, dtype = [9, 3, 0, 17, 5], 2, 32, torch.float32
    max_seqlen = max(lengths)
    qkv, (q, k, v) = _qkv(len(lengths), max_seqlen, heads, head_dim, dtype, device)
    bias = torch.randn(len(lengths), 1, max_seqlen, max_seqlen, device=device)
    if layout == "padded":
        kwargs = dict(key_padding_mask=_lengths_mask(lengths, max_seqlen, False, device), bias=bias)
    else:
        qkv = _packed(qkv.detach(), lengths).requires_grad_()
        q, k, v = qkv.unbind(1)
        kwargs = dict(cu_seqlens=_cu_seqlens(lengths, device), max_seqlen=max_seqlen, bias=bias)
    out = attention(q, k, v, **kwargs)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert kernel_launches.count(FWD) == 3
    _check_against_float64(qkv, out, grad_out, dtype, **kwargs)


@contextlib.contextmanager
def _tf32(allowed):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("head_dim", [32, 80], ids=["D32", "D80"])  # head-dim buckets 64 and 128
@pytest.mark.parametrize("bias_kind", [None, "full"], ids=["no-bias", "bias"])
def test_tf32_configurations_match_float64(device, triton_backend, launch_arguments, poisoned_allocations,
                                           head_dim, bias_kind):
    """fp32 with torch.backends.cuda.matmul.allow_tf32: the forward and both backward kernels run
    their TF32 configurations (every one, over the four cases) with TF32 dot products, and match
    float64 within TF32's tolerance. The interpreter computes TF32 dots in fp32; on a GPU they
    round (test_gpu_tf32_only_when_allowed shows it)."""
    configs = importlib.import_module("fastencoder.kernels.attention.configs")
    with _tf32(True):
        qkv, out, grad_out, kwargs = _run_padded(device, torch.float32, 77, head_dim, [77, 30], False, bias_kind)
    key = ("tf32", 64 if head_dim <= 64 else 128, bias_kind is not None)
    expected = dict(zip((FWD, "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"),
                        (configs._FWD_CONFIGS[key], *configs._BWD_CONFIGS[key])))
    launched = {name: (arguments["BLOCK_M"], arguments["BLOCK_N"], arguments["num_warps"],
                       arguments["num_stages"])
                for name, arguments in launch_arguments if arguments.get("ALLOW_TF32") is True}
    assert launched == expected
    assert all(arguments.get("ALLOW_TF32") in (True, None) for _, arguments in launch_arguments)
    _check_against_float64(qkv, out, grad_out, "tf32", **kwargs)


@pytest.mark.gpu
def test_gpu_tf32_only_when_allowed(device, triton_backend):
    """On a GPU, TF32 shows: fp32-exact without it (errors ~1e-6), TF32-sized errors with it."""
    errors = {}
    for allow_tf32 in (False, True):
        torch.manual_seed(0)
        with _tf32(allow_tf32):
            qkv, out, grad_out, kwargs = _run_padded(device, torch.float32, 256, 64, [256, 100], False, "full")
        _check_against_float64(qkv, out, grad_out, "tf32" if allow_tf32 else torch.float32, **kwargs)
        reference = qkv.detach().double()
        expected = attention_reference(*reference.unbind(2), **{n: _float64(v) for n, v in kwargs.items()})
        errors[allow_tf32] = (out.double() - expected).abs().max().item()
    assert errors[False] < 1e-5 < errors[True], errors


def _fp16_attention_and_grads(q, k, v, mask, grad_out):
    """PyTorch attention computed entirely in fp16 (what the kernel's error is measured against)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = (torch.softmax(scores, dim=-1) @ v.transpose(1, 2)).transpose(1, 2)
    out.backward(grad_out)
    return out, q.grad, k.grad, v.grad


def test_fp16_error_at_most_twice_pytorch_fp16(device, triton_backend, kernel_launches):
    """As FlashAttention tests it: error vs float64 at most 2x that of PyTorch's own fp16 math.
    The 1e-4 floor (a fifth of one fp16 ulp at 1.0) only matters where both errors are ~0."""
    batch, seqlen, heads, head_dim = 2, 129, 2, 64
    qkv, (q, k, v) = _qkv(batch, seqlen, heads, head_dim, torch.float16, device)
    mask = _lengths_mask([129, 60], seqlen, False, device)
    out = attention(q, k, v, key_padding_mask=mask)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert FWD in kernel_launches and all(name in kernel_launches for name in BWD)
    kernel = (out, *qkv.grad.unbind(2))
    pytorch_fp16 = _fp16_attention_and_grads(q, k, v, mask, grad_out)
    exact = _fp16_attention_and_grads(*(t.double() for t in (q, k, v)), mask, grad_out.double())
    for name, ours, theirs, truth in zip(("out", "dq", "dk", "dv"), kernel, pytorch_fp16, exact):
        our_error = (ours.double() - truth).abs().max().item()
        their_error = (theirs.double() - truth).abs().max().item()
        assert our_error <= 2 * their_error + 1e-4, f"{name}: {our_error} vs PyTorch fp16 {their_error}"


def test_dropout_keep_rate_and_mask_from_the_forward(device, triton_backend, poisoned_allocations):
    """With q = k = 0 every probability is 1/S, and with v = identity the output row i is
    keep[i, :] / (S·(1-p)): the forward kernel's own dropout mask, read back. It differs between
    sequences, heads, query rows and key columns (a counter that left one of them out would repeat
    a mask and still keep the right fraction)."""
    batch, seqlen, heads, p = 2, 64, 2, 0.3
    q = torch.zeros(batch, seqlen, heads, seqlen, device=device)
    v = torch.eye(seqlen, device=device)[None, :, None, :].expand(batch, seqlen, heads, seqlen)
    torch.manual_seed(1234)
    out = attention(q, q, v.contiguous(), dropout_p=p)
    kept = (out * seqlen * (1 - p)).permute(0, 2, 1, 3)  # [B, H, S, S]
    assert torch.allclose(kept, kept.round(), atol=1e-4)  # every entry exactly dropped or kept
    torch.manual_seed(1234)
    expected = _dropout_keep_mask(_draw_dropout_seed(), batch, heads, seqlen, p, device)
    assert torch.equal(kept.round().bool(), expected)
    masks = expected.flatten(0, 1)  # [B·H, S, S]
    assert torch.unique(masks.flatten(1), dim=0).shape[0] == batch * heads, "a mask repeats across (b, h)"
    for mask in masks:
        assert torch.unique(mask, dim=0).shape[0] == seqlen, "a mask repeats across query rows"
        assert torch.unique(mask.t(), dim=0).shape[0] == seqlen, "a mask repeats across key columns"
    samples = expected.numel()
    keep_rate = expected.float().mean().item()
    assert abs(keep_rate - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / samples), keep_rate


def _dropout_run(device, seed, p=0.2):
    torch.manual_seed(0)
    qkv, (q, k, v) = _qkv(2, 33, 2, 32, torch.float32, device)
    torch.manual_seed(seed)
    out = attention(q, k, v, dropout_p=p)
    out.backward(torch.ones_like(out))
    return out.detach(), qkv.grad


def test_dropout_same_seed_same_result(device, triton_backend):
    out, grad = _dropout_run(device, seed=7)
    same_out, same_grad = _dropout_run(device, seed=7)
    other_out, other_grad = _dropout_run(device, seed=8)
    assert torch.equal(out, same_out) and torch.equal(grad, same_grad)
    assert not torch.equal(out, other_out) and not torch.equal(grad, other_grad)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_dropout_gradients_match_reference_with_same_mask(device, triton_backend, kernel_launches,
                                                          poisoned_allocations, packed):
    p, heads, head_dim = 0.25, 2, 32
    lengths = [77, 20]
    max_seqlen = max(lengths)
    torch.manual_seed(3)
    if packed:
        qkv = torch.randn(sum(lengths), 3, heads, head_dim, device=device, requires_grad=True)
        kwargs = dict(cu_seqlens=_cu_seqlens(lengths, device), max_seqlen=max_seqlen)
    else:
        qkv = torch.randn(len(lengths), max_seqlen, 3, heads, head_dim, device=device, requires_grad=True)
        kwargs = dict(key_padding_mask=_lengths_mask(lengths, max_seqlen, False, device),
                      bias=torch.randn(len(lengths), 1, max_seqlen, max_seqlen, device=device))
    q, k, v = qkv.unbind(-3)
    torch.manual_seed(99)
    out = attention(q, k, v, dropout_p=p, **kwargs)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert FWD in kernel_launches and all(name in kernel_launches for name in BWD)
    torch.manual_seed(99)
    keep = _dropout_keep_mask(_draw_dropout_seed(), len(lengths), heads, max_seqlen, p, device)
    _check_against_float64(qkv, out, grad_out, torch.float32, dropout_mask=keep, dropout_p=p, **kwargs)


def test_dropout_seed_is_a_scalar_kernel_argument(device, triton_backend, launch_arguments):
    """The seed reaches the kernels as a Python int (no tensor to copy to the device, no wait for the
    copy, nothing a CUDA graph capture would refuse), drawn from torch's CPU generator, and the
    backward kernels receive the forward's."""
    _, (q, k, v) = _qkv(2, 33, 2, 32, torch.float32, device)
    torch.manual_seed(11)
    out = attention(q, k, v, dropout_p=0.2)
    out.backward(torch.ones_like(out))
    torch.manual_seed(11)
    expected = int(_draw_dropout_seed())
    seeds = {name: arguments["seed"] for name, arguments in launch_arguments if "seed" in arguments}
    assert set(seeds) == {FWD, "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"}
    assert all(type(seed) is int and seed == expected for seed in seeds.values()), seeds


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gradient_checkpointing_enable's new name
def test_gradient_checkpointing_recomputes_the_same_dropout_masks(device, triton_backend, launch_arguments):
    """A training step with attention and hidden dropout gives bit-identical gradients with gradient
    checkpointing and without: Hugging Face's checkpointing restores torch's CPU generator for the
    recompute, so the recomputed attention draws the forward's seeds (shown launch by launch)."""
    config = bert_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3, num_hidden_layers=2)
    model = models.BertModel(config).train()
    batch = ragged_batch(config)
    gradients, seeds = [], []
    for checkpointing, seed in ((False, 5), (True, 5), (False, 6)):
        if checkpointing:
            model.gradient_checkpointing_enable()
        else:
            model.gradient_checkpointing_disable()
        model.zero_grad()
        launch_arguments.clear()
        torch.manual_seed(seed)
        output = model(**batch)
        (output.last_hidden_state.square().sum() + output.pooler_output.sum()).backward()
        gradients.append({name: param.grad.clone() for name, param in model.named_parameters()})
        seeds.append([arguments["seed"] for name, arguments in launch_arguments if name == FWD])
    plain, checkpointed, other_seed = gradients
    # the backward recomputes the layers last first, each with its forward's seed
    assert len(seeds[0]) == 2 and seeds[1] == seeds[0] + seeds[0][::-1], seeds
    for name, gradient in plain.items():
        assert torch.equal(checkpointed[name], gradient), name
    assert any(not torch.equal(other_seed[name], gradient) for name, gradient in plain.items())


@pytest.mark.gpu
def test_gpu_dropout_training_step_never_waits_for_the_host(device, triton_backend):
    """After a warm-up (compilation), a forward and backward with dropout make no synchronising call."""
    qkv, (q, k, v) = _qkv(2, 100, 2, 64, torch.float16, device)
    attention(q, k, v, dropout_p=0.1).sum().backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attention(q, k, v, dropout_p=0.1).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_torch_backend_runs_the_pytorch_path(device, torch_backend, kernel_launches):
    _, (q, k, v) = _qkv(2, 9, 2, 24, torch.float32, device)  # D=24: no kernel limit on this path
    mask = _lengths_mask([9, 4], 9, False, device)
    out = attention(q, k, v, key_padding_mask=mask)
    assert kernel_launches == []
    torch.testing.assert_close(out, attention_torch(q, k, v, key_padding_mask=mask), atol=0, rtol=0)


def test_torch_compile_traces_the_custom_op(device, triton_backend, kernel_launches):
    _, (q, k, v) = _qkv(2, 17, 2, 32, torch.float32, device)
    mask = _lengths_mask([17, 5], 17, False, device)

    def layer(q, k, v, mask):
        return attention(q, k, v, key_padding_mask=mask) * 2

    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(q, k, v, mask)
        expected = attention_reference(q, k, v, key_padding_mask=mask) * 2
    assert FWD in kernel_launches
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)


def test_torch_compile_with_dropout_draws_as_eager_does(device, triton_backend, kernel_launches):
    """fullgraph tracing takes the seed's draw along: under one torch.manual_seed the compiled and
    the eager call give the same output and gradients, and a new seed a new mask."""
    qkv, (q, k, v) = _qkv(2, 17, 2, 32, torch.float32, device)
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, dropout_p=0.3), fullgraph=True,
                             backend="aot_eager")
    results = []
    for run, seed in ((compiled, 4), (lambda *qkv: attention(*qkv, dropout_p=0.3), 4), (compiled, 5)):
        torch.manual_seed(seed)
        out = run(q, k, v)
        qkv.grad = None
        out.backward(torch.ones_like(out))
        results.append((out.detach(), qkv.grad))
    assert FWD in kernel_launches
    (out, grad), (eager_out, eager_grad), (other_out, _) = results
    assert torch.equal(out, eager_out) and torch.equal(grad, eager_grad)
    assert not torch.equal(out, other_out)


def test_empty_input(device, triton_backend, kernel_launches):
    q = torch.randn(2, 0, 2, 32, device=device)
    assert attention(q, q, q).shape == (2, 0, 2, 32)
    assert kernel_launches == []


def _bad_inputs(device):
    q = torch.randn(2, 8, 2, 32, device=device)
    packed = torch.randn(8, 2, 32, device=device)
    cu = torch.tensor([0, 5, 8], dtype=torch.int32, device=device)
    mask = torch.ones(2, 8, dtype=torch.bool, device=device)
    return [
        # (q, k, v, kwargs, exception, words of the message)
        (q[0], q[0], q[0], {}, ValueError, "[B, S, H, D]"),
        (q, q[:, :4], q, {}, ValueError, "k must have q's shape"),
        (q, q, q.half(), {}, TypeError, "v is torch.float16"),
        (q.long(), q, q, {}, TypeError, "float16, bfloat16 or float32"),
        (q, q, "v", {}, TypeError, "torch.Tensor"),
        (q, q, q, dict(key_padding_mask=mask.float()), TypeError, "torch.bool"),
        (q, q, q, dict(key_padding_mask=mask[:, :4]), ValueError, "key_padding_mask must have shape"),
        (q, q, q, dict(bias=torch.zeros(2, 2, 8, 4, device=device)), ValueError, "does not broadcast"),
        (q, q, q, dict(bias=torch.zeros(2, 2, 8, device=device).half()), TypeError, "bias is torch.float16"),
        (q, q, q, dict(bias=torch.zeros(1, 2, 2, 8, 8, device=device)), ValueError, "does not broadcast"),
        (q, q, q, dict(dropout_p=1.0), ValueError, "dropout_p"),
        (q, q, q, dict(dropout_p=-0.1), ValueError, "dropout_p"),
        (q, q, q, dict(scale=float("nan")), ValueError, "scale"),
        (q, q, q, dict(max_seqlen=8), ValueError, "only for the packed layout"),
        (packed, packed, packed, {}, ValueError, "[B, S, H, D]"),
        (q, q, q, dict(cu_seqlens=cu, max_seqlen=8), ValueError, "[T, H, D]"),
        (packed, packed, packed, dict(cu_seqlens=cu.long(), max_seqlen=5), TypeError, "int32"),
        (packed, packed, packed, dict(cu_seqlens=cu[None], max_seqlen=5), ValueError, "1-D"),
        (packed, packed, packed, dict(cu_seqlens=cu + 1, max_seqlen=5), ValueError, "start at 0"),
        (packed, packed, packed, dict(cu_seqlens=torch.tensor([0, 6, 5, 8], dtype=torch.int32,
                                                              device=device), max_seqlen=6),
         ValueError, "never decrease"),
        (packed, packed, packed, dict(cu_seqlens=cu[:2], max_seqlen=5), ValueError, "end at T = 8"),
        (packed, packed, packed, dict(cu_seqlens=cu), ValueError, "max_seqlen must be an int"),
        (packed, packed, packed, dict(cu_seqlens=cu, max_seqlen=4), ValueError, "longest sequence (5)"),
        (packed, packed, packed, dict(cu_seqlens=cu, max_seqlen=5, key_padding_mask=mask),
         ValueError, "key_padding_mask cannot be used with cu_seqlens"),
        # limits of the kernels only (the torch backend takes these)
        (torch.randn(2, 32, 2, 8, device=device).transpose(1, 3), q, q, {}, ValueError, "unit stride"),
        (q, q, q, dict(bias=torch.zeros(8, 8, device=device, requires_grad=True)),
         NotImplementedError, "gradient of bias"),
    ]


@pytest.mark.parametrize("case", range(26))
def test_bad_input_is_refused_before_any_launch(device, triton_backend, kernel_launches, case):
    cases = _bad_inputs(device)
    assert len(cases) == 26
    q, k, v, kwargs, error, words = cases[case]
    with pytest.raises(error) as raised:
        attention(q, k, v, **kwargs)
    assert words in str(raised.value), str(raised.value)
    assert kernel_launches == []


@pytest.mark.parametrize("inference", [False, True], ids=["normal tensor", "inference tensor"])
def test_cu_seqlens_changed_in_place_is_checked_again(device, triton_backend, kernel_launches, inference):
    """cu_seqlens is read back once and remembered while unchanged (kernels/_checks.py remembered):
    an in-place change, which bumps the version or (inference tensors) is not tracked, is seen."""
    packed = torch.randn(8, 2, 16, device=device)
    with torch.inference_mode(inference):
        cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
        attention(packed, packed, packed, cu_seqlens=cu_seqlens, max_seqlen=5)
        launches = len(kernel_launches)
        cu_seqlens[1] = 9
        with pytest.raises(ValueError, match="never decrease"):
            attention(packed, packed, packed, cu_seqlens=cu_seqlens, max_seqlen=5)
    assert len(kernel_launches) == launches


def test_head_dim_without_a_kernel_runs_the_reference(device, triton_backend, kernel_launches):
    q, k, v = (torch.randn(2, 9, 2, 24, device=device) for _ in range(3))
    expected = attention_reference(q.double(), k.double(), v.double())
    torch.testing.assert_close(attention(q, k, v).double(), expected, atol=1e-5, rtol=1e-5)
    assert kernel_launches == []


def test_dropout_sequence_limit(device, triton_backend, kernel_launches):
    q = torch.randn(1, MAX_DROPOUT_SEQLEN + 1, 1, 16, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="dropout supports sequences up to"):
        attention(q, q, q, dropout_p=0.1)
    assert kernel_launches == []


# On a GPU: bf16 (whose tl.dot the interpreter gets wrong), every head dim, and BERT-base sizes.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 80, 96, 128])
def test_gpu_head_dims(device, triton_backend, kernel_launches, dtype, head_dim):
    qkv, out, grad_out, kwargs = _run_padded(device, dtype, 129, head_dim, [129, 1], False, "full")
    assert FWD in kernel_launches and all(name in kernel_launches for name in BWD)
    _check_against_float64(qkv, out, grad_out, dtype, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seqlen", [128, 512])
def test_gpu_bert_sizes(device, triton_backend, kernel_launches, dtype, seqlen):
    batch, heads, head_dim = 4, 12, 128
    qkv, (q, k, v) = _qkv(batch, seqlen, heads, head_dim, dtype, device)
    lengths = [seqlen, seqlen // 2, 1, seqlen - 3]
    kwargs = dict(key_padding_mask=_lengths_mask(lengths, seqlen, False, device))
    out = attention(q, k, v, **kwargs)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert FWD in kernel_launches and all(name in kernel_launches for name in BWD)
    _check_against_float64(qkv, out, grad_out, dtype, **kwargs)
    packed_qkv = _packed(qkv.detach(), lengths).requires_grad_()
    cu_seqlens = _cu_seqlens(lengths, device)
    packed_out = attention(*packed_qkv.unbind(1), cu_seqlens=cu_seqlens, max_seqlen=seqlen)
    packed_grad = torch.randn_like(packed_out)
    packed_out.backward(packed_grad)
    _check_against_float64(packed_qkv, packed_out, packed_grad, dtype, cu_seqlens=cu_seqlens,
                           max_seqlen=seqlen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_dropout_gradients(device, triton_backend, dtype):
    batch, seqlen, heads, head_dim, p = 2, 200, 4, 64, 0.1
    qkv, (q, k, v) = _qkv(batch, seqlen, heads, head_dim, dtype, device)
    torch.manual_seed(5)
    out = attention(q, k, v, dropout_p=p)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    torch.manual_seed(5)
    keep = _dropout_keep_mask(_draw_dropout_seed(), batch, heads, seqlen, p, device)
    _check_against_float64(qkv, out, grad_out, dtype, dropout_mask=keep, dropout_p=p)
