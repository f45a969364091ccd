"""pytest-benchmark view of the headline kernels and model, GPU only:

    pytest benchmarks -m gpu --benchmark-json=out.json [--benchmark-compare] [--benchmark-histogram]

pytest-benchmark's own statistics come from a host clock around synchronised calls; the CUDA-event
median and spread (benchmarks/timing.py) go into `extra_info`, and those are the numbers to quote.
"""
import pytest
import torch

from fastencoder.benchmarks import roofline, sweep
from fastencoder.benchmarks.timing import time_calls

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (gpu marker)"),
]


def _measure(benchmark, run, inputs, **info):
    events = time_calls(run, inputs)

    def synchronised():
        run(inputs[0])
        torch.cuda.synchronize()

    benchmark.pedantic(synchronised, rounds=30, warmup_rounds=5)
    benchmark.extra_info.update(cuda_event_median_ms=events["median_ms"], cuda_event_iqr_ms=events["iqr_ms"], **info)


@pytest.mark.parametrize("seqlen", [128, 512])
def test_attention_forward_with_padding_mask(benchmark, seqlen):
    from fastencoder.kernels.attention import attention

    batch, heads, head_dim = 32, 12, 64
    lengths = sweep.ragged_lengths(batch, seqlen)
    mask = sweep.padding_mask(lengths, seqlen, "cuda")
    inputs = [[torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.float16) for _ in range(3)]
              for _ in range(4)]
    _measure(benchmark, lambda qkv: attention(*qkv, key_padding_mask=mask), inputs,
             flops=roofline.attention_flops(lengths, heads, head_dim))


def test_layer_norm_residual_forward(benchmark):
    from fastencoder.kernels import layer_norm

    weight, bias = torch.randn(768, device="cuda", dtype=torch.float16), torch.randn(768, device="cuda", dtype=torch.float16)
    inputs = [[torch.randn(65536, 768, device="cuda", dtype=torch.float16) for _ in range(2)] for _ in range(2)]
    _measure(benchmark, lambda xr: layer_norm(xr[0], weight, bias, 1e-12, residual=xr[1]), inputs,
             bytes=roofline.layer_norm_bytes(65536, 768, 2, residual=True))


def test_linear_bias_gelu(benchmark):
    from fastencoder.kernels import linear

    weight = torch.randn(3072, 768, device="cuda", dtype=torch.float16) / 768**0.5
    bias = torch.randn(3072, device="cuda", dtype=torch.float16)
    inputs = [torch.randn(4096, 768, device="cuda", dtype=torch.float16) for _ in range(8)]
    _measure(benchmark, lambda x: linear(x, weight, bias, "gelu"), inputs, flops=roofline.linear_flops(4096, 3072, 768))


@pytest.mark.parametrize("variant", ["fastencoder", "HF sdpa"])
def test_bert_base_forward_32x128(benchmark, variant):
    config, models = sweep.build_models("bert-base", torch.float16, {}, compile_baseline=False)
    inputs = [sweep.model_inputs(config, [128] * 32, 128, seed) for seed in range(4)]
    model = models[variant]
    with torch.inference_mode():
        _measure(benchmark, lambda kwargs: model(**kwargs), inputs, tokens=32 * 128)
