"""What the ops derive from a mask, cu_seqlens or indices is remembered per tensor: reused on the
stream that computed it only, for the few latest uses of the tensor, and never past the tensor."""
import gc
import importlib
import weakref

import pytest
import torch

from fastencoder.kernels import _checks, attention
from fastencoder.kernels._checks import remember, remembered
from fastencoder.kernels.attention import attention_reference

attention_op = importlib.import_module("fastencoder.kernels.attention.op")


class Counting:
    """A derivation that counts its calls: tensor + offset, a new tensor each time."""

    def __init__(self):
        self.calls = 0

    def __call__(self, tensor, offset):
        self.calls += 1
        return tensor + offset


def test_a_reused_buffer_keeps_its_latest_uses_only():
    """A long-lived buffer derived with ever new arguments (sizes) keeps MAX_REMEMBERED entries, the
    least recently used going first; an entry still held is reused, an evicted one derived again."""
    buffer, derive = torch.arange(5), Counting()
    for offset in range(10):
        remembered(buffer, derive, offset)
    assert len(_checks._remembered[buffer]) == 4
    assert derive.calls == 10
    remembered(buffer, derive, 6)  # held: reused, and now the most recent
    assert derive.calls == 10
    remembered(buffer, derive, 10)  # evicts 7, the least recently used, not 6
    assert torch.equal(remembered(buffer, derive, 6), buffer + 6) and derive.calls == 11
    assert torch.equal(remembered(buffer, derive, 7), buffer + 7) and derive.calls == 12
    assert len(_checks._remembered[buffer]) == 4 == _checks.MAX_REMEMBERED


def test_entries_go_with_their_tensor():
    mask, derive = torch.arange(5), Counting()
    value = weakref.ref(remembered(mask, derive, 1))
    assert value() is not None  # held by the entry
    del mask
    gc.collect()
    assert value() is None


def test_derivations_are_remembered_per_stream(monkeypatch):
    """Each stream derives its own copy (no event orders another stream after the one that
    computed it, and the allocator would free it after that stream's work only); on its own
    stream a derivation is reused. Streams simulated: the stream lookup is what changes."""
    stream = {"now": 1}
    monkeypatch.setattr(_checks, "_stream_of", lambda tensor: stream["now"], raising=False)
    mask, derive = torch.arange(5), Counting()
    on_first = remembered(mask, derive, 1)
    stream["now"] = 2
    on_second = remembered(mask, derive, 1)
    assert derive.calls == 2 and on_second is not on_first
    assert remembered(mask, derive, 1) is on_second
    stream["now"] = 1
    assert remembered(mask, derive, 1) is on_first and derive.calls == 2
    remember(mask, torch.Tensor.tolist, [7])  # what a caller records holds for its stream only
    assert remembered(mask, torch.Tensor.tolist) == [7]
    stream["now"] = 2
    assert remembered(mask, torch.Tensor.tolist) == mask.tolist()


@pytest.mark.gpu
def test_gpu_two_streams_share_one_mask(triton_backend):
    """One key padding mask used by attention on two streams: each stream derives its key lengths
    on itself, and both results are right."""
    qkv = torch.randn(3, 2, 200, 2, 64, device="cuda", dtype=torch.float16)
    mask = torch.arange(200, device="cuda") < torch.tensor([200, 77], device="cuda")[:, None]
    expected = attention_reference(*qkv, key_padding_mask=mask)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = []
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outs.append(attention(*qkv, key_padding_mask=mask))
    torch.cuda.synchronize()
    keys = [key for key in _checks._remembered[mask] if key[0] is attention_op._lengths_of_prefixes]
    assert sorted(key[-1] for key in keys) == sorted(stream.cuda_stream for stream in streams)
    for out in outs:
        torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)  # fp16 tolerances of test_attention
