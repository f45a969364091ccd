"""While a CUDA graph captures or torch.compile traces, no op reads a tensor back to the host (a
capture fails on a device-to-host copy): value checks are skipped, and the kernels bound what they
read and write on the device instead. On the CPU the flag is raised by hand and every host read
made by fastencoder's own code raises."""
import contextlib
import importlib
import os
import sys

import pytest
import torch

import fastencoder
from fastencoder.kernels import _checks, attention, layer_norm, linear, pad, unpad
from fastencoder.kernels.attention import attention_reference
from fastencoder.kernels.layer_norm import layer_norm_reference
from fastencoder.kernels.linear import linear_reference
from fastencoder.kernels.padding import pad_reference, unpad_reference

attention_op = importlib.import_module("fastencoder.kernels.attention.op")
attention_dropout = importlib.import_module("fastencoder.kernels.attention.dropout")
PACKAGE_DIRS = tuple(os.path.dirname(module.__file__) + os.sep for module in (fastencoder, fastencoder.kernels))
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


_references = []  # non-empty while a reference (not an op) computes: its reads are not the ops'


@contextlib.contextmanager
def _reference():
    _references.append(True)
    try:
        yield
    finally:
        _references.pop()


@pytest.fixture
def host_reads_refused(monkeypatch):
    """Every host read of a tensor (item, tolist, numpy, bool/int/float/index) made directly by
    fastencoder's ops raises; torch's and Triton's interpreter's own reads are let through, and so
    are the references' (inside `_reference()`)."""
    for method in HOST_READS:
        original = getattr(torch.Tensor, method)

        def guarded(self, *args, _original=original, _method=method, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE_DIRS) and not _references:
                raise AssertionError(f"{caller} read a tensor back ({_method}) while capturing")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, guarded)


@pytest.fixture(params=["capturing", "compiling"])
def capturing(request, monkeypatch):
    """Every op sees a capture in progress (the detector of every kernels module says so), or
    torch.compile tracing (torch's own flag raised: the ops then run as traced, through their
    torch.library custom ops)."""
    if request.param == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        return
    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("fastencoder.kernels") and hasattr(module, "capturing_or_compiling"):
            monkeypatch.setattr(module, "capturing_or_compiling", lambda tensor: True)
            patched.append(name.rsplit(".", 1)[-1])
    assert {"_checks", "checks", "reference", "padding"} <= set(patched)  # attention.checks, .reference


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _check_op(op, reference, inputs, atol=1e-4):
    """op(*inputs) and its input gradients against reference on float64 copies."""
    ours, theirs = _leaves(*inputs), _leaves(*(t.double() for t in inputs))
    with _reference():
        expected = reference(*theirs)
    out = op(*ours)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=atol)
    grad = torch.randn_like(expected)
    out.backward(grad.to(out.dtype))
    with _reference():
        expected.backward(grad)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=atol, rtol=atol)


@pytest.fixture(params=["triton", "torch"])
def either_backend(request):
    previous = fastencoder.get_backend()
    fastencoder.set_backend(request.param)
    yield request.param
    fastencoder.set_backend(previous)


def test_no_op_reads_a_tensor_back_while_capturing(either_backend, capturing, host_reads_refused):
    """linear, layer_norm, attention (padded with a mask; packed), pad and unpad, forward and
    backward, through the kernels and the PyTorch path: correct results (fp32 vs float64, 1e-4 as
    in the ops' own tests) with no host read."""
    x, weight, bias = torch.randn(19, 40), torch.randn(24, 40) / 40**0.5, torch.randn(24)
    _check_op(lambda x, w, b: linear(x, w, b, "gelu"), lambda x, w, b: linear_reference(x, w, b, "gelu"),
              (x, weight, bias))
    gamma, beta = torch.randn(40), torch.randn(40)
    _check_op(lambda x, g, b: layer_norm(x, g, b, 1e-12), lambda x, g, b: layer_norm_reference(x, g, b, 1e-12),
              (x, gamma, beta))
    q, k, v = torch.randn(3, 2, 17, 2, 16).unbind(0)
    mask = torch.arange(17) < torch.tensor([17, 9])[:, None]
    _check_op(lambda q, k, v: attention(q, k, v, key_padding_mask=mask),
              lambda q, k, v: attention_reference(q, k, v, key_padding_mask=mask), (q, k, v))
    cu_seqlens = torch.tensor([0, 17, 26], dtype=torch.int32)
    packed = [t[mask] for t in (q, k, v)]
    _check_op(lambda q, k, v: attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=17),
              lambda q, k, v: attention_reference(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=17), packed)
    indices = mask.flatten().nonzero()[:, 0]
    hidden = torch.randn(2, 17, 40)
    _check_op(lambda h: unpad(h, indices), lambda h: unpad_reference(h, indices), (hidden,))
    _check_op(lambda r: pad(r, indices, 2, 17), lambda r: pad_reference(r, indices, 2, 17), (hidden[mask],))


def test_packed_batches_beyond_the_grid_are_refused_while_capturing(triton_backend, host_reads_refused,
                                                                   monkeypatch):
    """More sequences x heads than CUDA's grid takes run in chunks found by reading cu_seqlens
    back: while a CUDA graph captures that is refused with the limit and the ways out (limit
    shrunk to 5; torch.compile instead breaks its graph there and reads)."""
    monkeypatch.setattr(attention_op, "MAX_BATCH_HEADS", 5)
    for module in (_checks, attention_op):
        monkeypatch.setattr(module, "capturing", lambda tensor: True)
    q = torch.randn(26, 2, 16)
    cu_seqlens = torch.tensor([0, 9, 12, 17, 26], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match=r"at most 2 sequences a call.*set_backend\('torch'\)"):
        attention(q, q, q, cu_seqlens=cu_seqlens, max_seqlen=9)


def test_values_are_still_checked_outside_a_capture(triton_backend):
    """The checks skipped while capturing still refuse bad values eagerly."""
    q = torch.randn(26, 2, 16)
    with pytest.raises(ValueError, match="longest sequence"):
        attention(q, q, q, cu_seqlens=torch.tensor([0, 17, 26], dtype=torch.int32), max_seqlen=16)
    with pytest.raises(ValueError, match="strictly increasing"):
        unpad(torch.randn(2, 17, 8), torch.tensor([3, 1]))


def test_sequences_longer_than_max_seqlen_are_cut_on_the_device(triton_backend, capturing,
                                                                 host_reads_refused, poisoned_allocations):
    """Unchecked (capturing), a sequence longer than max_seqlen is attended over its first
    max_seqlen tokens only: those rows are its first max_seqlen tokens' attention among themselves,
    its rows past the bound are left unwritten, and no other sequence's rows, statistics or
    gradients are touched (the kernels' statistics rows end at max_seqlen: a longer sequence would
    write the next sequence's)."""
    lengths, max_seqlen = [21, 13, 16], 16  # 21 > 16: 5 rows past the bound, crossing a block edge
    cu_seqlens = torch.tensor([0, 21, 34, 50], dtype=torch.int32)
    qkv = torch.randn(3, 50, 2, 16)
    q, k, v = _leaves(*qkv)
    out, stats = attention_op._call_attention_fwd(q, k, v, None, None, None, cu_seqlens, None, max_seqlen,
                                                      0.25, 0.0, False, None, None, None)
    out.backward(torch.ones_like(out))  # rows past the bound must not reach the inputs' gradients
    kept = torch.cat([torch.arange(0, 16), torch.arange(21, 50)])
    kept_cu = torch.tensor([0, 16, 29, 45], dtype=torch.int32)
    reference = _leaves(*(t[kept].double() for t in qkv))
    with _reference():
        expected = attention_reference(*reference, cu_seqlens=kept_cu, max_seqlen=max_seqlen, scale=0.25)
        expected.backward(torch.ones_like(expected))
    torch.testing.assert_close(out[kept].double(), expected, atol=1e-4, rtol=1e-4)
    assert out[16:21].isnan().all(), "rows past max_seqlen are not written"
    assert stats.isfinite().all() and stats.shape == (3, 2, 2, max_seqlen)
    for got, want in zip((q, k, v), reference):
        torch.testing.assert_close(got.grad[kept].double(), want.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_capture_of_every_op_replays_new_inputs(triton_backend):
    """Each op captured in a CUDA graph (which fails on any host read), then replayed on new
    contents of its static inputs: the replay matches the op run eagerly on them."""
    x, weight, bias, gamma = torch.randn(19, 40), torch.randn(24, 40) / 40**0.5, torch.randn(24), torch.randn(40)
    qkv = torch.randn(3, 2, 17, 2, 16)
    mask = torch.arange(17) < torch.tensor([17, 9])[:, None]
    cu_seqlens = torch.tensor([0, 17, 26], dtype=torch.int32)
    indices = mask.flatten().nonzero()[:, 0]
    hidden = torch.randn(2, 17, 40)
    cases = {
        "linear": (lambda: linear(x, weight, bias, "gelu"), x),
        "layer_norm": (lambda: layer_norm(x, gamma, bias[:1].expand(40).contiguous(), 1e-12), x),
        "attention padded": (lambda: attention(*qkv.unbind(0), key_padding_mask=mask), qkv),
        "attention packed": (lambda: attention(*qkv.flatten(1, 2)[:, indices].unbind(0), cu_seqlens=cu_seqlens,
                                               max_seqlen=17), qkv),
        "unpad": (lambda: unpad(hidden, indices), hidden),
        "pad": (lambda: pad(hidden.flatten(0, 1)[indices], indices, 2, 17), hidden),
    }
    for name, (op, static_input) in cases.items():
        op()  # compiles, autotunes and fills the caches outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = op()
        static_input.copy_(torch.randn_like(static_input))
        graph.replay()
        torch.testing.assert_close(out, op(), msg=lambda message: f"{name}: {message}")


DROPOUT_REFUSED = r"cannot be captured in a CUDA graph.*dropout_p=0.*set_backend\('torch'\)"


def test_kernels_refuse_dropout_while_capturing(triton_backend, monkeypatch, kernel_launches):
    """The kernels' dropout seed is a launch argument, which a CUDA graph would keep: every replay
    would repeat one mask. While a graph captures, attention with dropout is refused before any
    launch, forward or backward, naming the ways out; without dropout, or eagerly, it runs."""
    qkv = torch.randn(2, 17, 3, 2, 16, requires_grad=True)
    q, k, v = qkv.unbind(2)
    eager = attention(q, k, v, dropout_p=0.2)  # eagerly: dropout runs
    kernel_launches.clear()
    monkeypatch.setattr(attention_dropout, "capturing", lambda tensor: True)
    with pytest.raises(RuntimeError, match=DROPOUT_REFUSED):
        attention(q, k, v, dropout_p=0.2)
    with pytest.raises(RuntimeError, match=DROPOUT_REFUSED):  # a backward captured on its own
        eager.backward(torch.ones_like(eager))
    assert kernel_launches == []
    torch.testing.assert_close(attention(q, k, v).double(),
                               attention_reference(*(t.double() for t in (q, k, v))), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_dropout_in_a_captured_graph(device):
    """Capturing a training-mode attention with dropout: the kernels refuse it; the PyTorch path
    (the way out the error names) draws a new mask on each replay."""
    qkv = torch.randn(2, 64, 3, 2, 64, device=device, dtype=torch.float16)
    previous = fastencoder.get_backend()
    try:
        for backend_name in ("triton", "torch"):
            fastencoder.set_backend(backend_name)
            attention(*qkv.unbind(2), dropout_p=0.3)  # compile and warm up outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            if backend_name == "triton":
                with pytest.raises(RuntimeError, match=DROPOUT_REFUSED):
                    with torch.cuda.graph(graph):
                        attention(*qkv.unbind(2), dropout_p=0.3)
                continue
            with torch.cuda.graph(graph):
                out = attention(*qkv.unbind(2), dropout_p=0.3)
            graph.replay()
            first = out.clone()
            graph.replay()
            assert not torch.equal(first, out), "a replay repeated the previous dropout mask"
    finally:
        fastencoder.set_backend(previous)
