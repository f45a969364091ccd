"""The benchmark sweep behind `fastencoder bench`: ceilings, kernels, whole models, side by side.

On a GPU every case is timed with CUDA events (benchmarks/timing.py) against what a user would
otherwise run; rates and roofline percentages come from benchmarks/roofline.py. Without a GPU the
sweep says so, checks the PyTorch-path models against Hugging Face at small sizes (no timings: CPU
and interpreter timings say nothing about kernel speed) and runs the static kernel report.
"""
import contextlib
import copy
import csv
import datetime
import itertools
import json
import platform
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from . import roofline
from .timing import input_sets_needed, peak_memory, time_calls

MODEL_CONFIGS = {
    "bert-base": dict(kind="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(kind="bert", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "albert-base": dict(kind="albert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, embedding_size=128, hidden_act="gelu_new"),
    "minilm-l6": dict(kind="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}
FULL = dict(
    models=list(MODEL_CONFIGS), dtypes=[torch.float16, torch.bfloat16],
    shapes=[(1, 128), (8, 128), (32, 128), (8, 512), (32, 384)],
    attention=dict(batch=32, heads=12, cases=[(128, 64), (256, 64), (384, 64), (512, 64), (128, 32)]),
    layer_norm=(65536, 768), linear=[(4096, 768, 3072), (4096, 3072, 768), (16384, 1024, 4096)],
    model_overrides={}, fine_tune=(32, 128), compile_shapes=None,
    # bert-base padded vs padding-free at growing padding: the data behind unpad="auto"'s threshold
    unpad_threshold=dict(shapes=[(32, 128), (32, 384)], padding=[0.02, 0.05, 0.1, 0.2, 0.3]),
)
QUICK = dict(
    FULL, models=["bert-base"], dtypes=[torch.float16], shapes=[(1, 128), (32, 128), (32, 384)],
    attention=dict(batch=32, heads=12, cases=[(128, 64), (512, 64)]), linear=[(4096, 768, 3072)],
    compile_shapes=[(32, 128)],
)
# CI keeps the sweep's code working on a CPU at toy sizes; its timings are never reported
SMOKE = dict(
    models=["bert-base", "albert-base"], dtypes=[torch.float32], shapes=[(2, 16)],
    attention=dict(batch=2, heads=2, cases=[(16, 64)]), layer_norm=(64, 768), linear=[(64, 96, 128)],
    model_overrides=dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128),
    fine_tune=(2, 16), compile_shapes=[], unpad_threshold=dict(shapes=[(2, 16)], padding=[0.25]),
)


def environment():
    info = dict(
        date=datetime.date.today().isoformat(), torch=torch.__version__, python=platform.python_version(),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    )
    with contextlib.suppress(ImportError):
        import triton

        info["triton"] = triton.__version__
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
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

                yield _row("kernel", name, "fastencoder", time_calls(ours, inputs), flops, moved, ceilings)
                # SDPA in its native [B, H, S, D] layout, the padding mask broadcast over heads
                sdpa_inputs = [[t.detach().transpose(1, 2).contiguous().requires_grad_(backward) for t in qkv]
                               for qkv in inputs]
                sdpa_mask = mask[:, None, None, :] if masked else None
                sdpa_grad = grad.transpose(1, 2)
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
        for variant, fn in (
            ("fastencoder", lambda xr: layer_norm(xr[0], weight, bias, 1e-12, residual=xr[1])),
            ("torch add + F.layer_norm", lambda xr: F.layer_norm(xr[0] + xr[1], (hidden,), weight, bias, 1e-12)),
        ):
            def run(xr, fn=fn):
                out = fn(xr)
                if backward:
                    out.backward(grad)

            yield _row("kernel", name, variant, time_calls(run, inputs), None, moved, ceilings)


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
        for variant, fn in (
            ("fastencoder", lambda x: linear(x, weight, bias, "gelu")),
            ("torch F.gelu(F.linear)", lambda x: F.gelu(F.linear(x, weight, bias))),
            ("torch.matmul (no bias, no GELU)", lambda x: torch.matmul(x, weight_t)),
        ):
            yield _row("kernel", name, variant, time_calls(fn, inputs), roofline.linear_flops(m, n, k),
                       roofline.linear_bytes(m, n, k, element_size), ceilings)


# ------------------------------------------------------------------------------------------ models
def model_config(name, overrides=None, **extra):
    import transformers

    spec = {**MODEL_CONFIGS[name], **(overrides or {}), **extra}
    kind = spec.pop("kind")
    if kind == "albert" and "embedding_size" in spec:
        spec["embedding_size"] = min(spec["embedding_size"], spec["hidden_size"])
    config_class = transformers.AlbertConfig if kind == "albert" else transformers.BertConfig
    return kind, config_class(**spec, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def build_models(name, dtype, overrides, compile_baseline):
    """fastencoder's model and the Hugging Face baselines, all holding the same weights."""
    import transformers

    import fastencoder.models as ours

    kind, config = model_config(name, overrides)
    hf_class = transformers.AlbertModel if kind == "albert" else transformers.BertModel
    our_class = ours.AlbertModel if kind == "albert" else ours.BertModel
    device = _device()
    torch.manual_seed(0)
    models = {}
    for implementation in ("eager", "sdpa"):
        own_config = copy.deepcopy(config)  # Hugging Face reads the implementation from it on every call
        own_config._attn_implementation = implementation
        models[f"HF {implementation}"] = hf_class(own_config).to(device=device, dtype=dtype).eval()
    weights = models["HF sdpa"].state_dict()
    models["HF eager"].load_state_dict(weights)
    # padded execution, padding-free (which only differs from it on ragged batches), and CUDA graphs
    for variant, unpad, cuda_graphs in (("fastencoder", False, False), ("fastencoder unpad", True, False),
                                        ("fastencoder cuda graphs", False, True)):
        models[variant] = our_class(config, unpad=unpad).to(device=device, dtype=dtype).eval()
        models[variant].load_state_dict(weights)
        models[variant].cuda_graphs = cuda_graphs
    if compile_baseline:
        models["torch.compile(HF sdpa)"] = torch.compile(models["HF sdpa"])
    return config, models


def model_inputs(config, lengths, seqlen, seed):
    """Random token ids (by seed) for sequences of the given lengths, padded to seqlen."""
    device = _device()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (len(lengths), seqlen), generator=generator).to(device)
    return dict(input_ids=input_ids, attention_mask=padding_mask(lengths, seqlen, device).long())


def model_cases(settings, dtype, ceilings):
    compile_shapes = settings["compile_shapes"]
    for name in settings["models"]:
        config, models = build_models(name, dtype, settings["model_overrides"], compile_shapes != [])
        for batch, seqlen in settings["shapes"]:
            for ragged in (False, True):
                lengths = ragged_lengths(batch, seqlen) if ragged else [seqlen] * batch
                case = f"{name} {_dtype_name(dtype)} fwd B{batch}xS{seqlen} {'ragged' if ragged else 'no padding'}"
                timed = {variant: model for variant, model in models.items()
                         if not (variant.startswith("torch.compile") and compile_shapes
                                 and (batch, seqlen) not in compile_shapes)}
                yield from time_models(timed, config, case, lengths, seqlen, ceilings)
        if name == "bert-base":
            threshold = settings["unpad_threshold"]
            padded_or_not = {variant: models[variant] for variant in ("fastencoder", "fastencoder unpad")}
            for (batch, seqlen), fraction in itertools.product(threshold["shapes"], threshold["padding"]):
                case = f"{name} {_dtype_name(dtype)} fwd B{batch}xS{seqlen} {fraction:.0%} padding"
                yield from time_models(padded_or_not, config, case, lengths_with_padding(batch, seqlen, fraction),
                                       seqlen, ceilings)
        del models
        if name == "bert-base":
            yield from fine_tune_cases(settings, dtype)


def time_models(models, config, case, lengths, seqlen, ceilings):
    """One row per model: forward time on batches of these lengths (token ids varying between the
    rotating input sets), tokens/s, peak memory, and what CUDA graphs held or why they did not run."""
    inputs = [model_inputs(config, lengths, seqlen, seed) for seed in range(4)]
    flops = roofline.encoder_flops(lengths, config.num_hidden_layers, config.hidden_size, config.intermediate_size)
    for variant, model in models.items():
        if variant == "fastencoder unpad" and min(lengths) == seqlen:
            continue  # without padding it runs the padded path
        run = lambda kwargs, model=model: model(**kwargs)
        try:
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
    """One fine-tuning step (forward, backward, AdamW) of a sequence classifier."""
    import transformers

    import fastencoder.models as ours

    batch, seqlen = settings["fine_tune"]
    case = f"bert-base {_dtype_name(dtype)} fine-tune step B{batch}xS{seqlen}"
    for variant, model_class in (("HF sdpa", transformers.BertForSequenceClassification),
                                 ("fastencoder", ours.BertForSequenceClassification)):
        _, config = model_config("bert-base", settings["model_overrides"], num_labels=2)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = model_class(config).to(device=_device(), dtype=dtype).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        labels = torch.randint(0, 2, (batch,), device=_device())
        inputs = [dict(model_inputs(config, [seqlen] * batch, seqlen, seed), labels=labels) for seed in range(2)]

        def step(kwargs, model=model, optimizer=optimizer):
            model(**kwargs).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        timing = time_calls(step, inputs, warmup=3, repeats=10)
        yield _row("model", case, variant, timing, tokens_per_s=batch * seqlen / (timing["median_ms"] * 1e-3),
                   peak_memory_bytes=peak_memory(step, inputs[0]))


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
    return rows


# ------------------------------------------------------------------------------------ without GPU
def cpu_model_check(name="bert-base"):
    """The PyTorch-path model against Hugging Face at a small size: max abs difference, no timing."""
    import transformers

    import fastencoder
    import fastencoder.models as ours

    _, config = model_config(name, dict(num_hidden_layers=2))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.BertModel(config).eval()
    mine = ours.BertModel(config).eval()
    mine.load_state_dict(hf.state_dict())
    inputs = model_inputs(config, ragged_lengths(4, 32), 32, 0)
    previous = fastencoder.get_backend()
    fastencoder.set_backend("torch")
    try:
        with torch.inference_mode():
            expected, got = hf(**inputs).last_hidden_state, mine(**inputs).last_hidden_state
    finally:
        fastencoder.set_backend(previous)
    real = inputs["attention_mask"].bool()
    return dict(group="check", case=f"{name} (2 layers) B4xS32 ragged fp32 on CPU, backend torch",
                variant="fastencoder vs HF eager", max_abs_diff=(got - expected)[real].abs().max().item())


# ---------------------------------------------------------------------------------------- reporting
def format_table(rows):
    lines = []
    for row in rows:
        if row["group"] == "check":
            lines.append(f"{row['case']:<60} {row['variant']:<26} max |diff| {row['max_abs_diff']:.2e}")
            continue
        if "error" in row:
            lines.append(f"{row['case']:<60} {row['variant']:<32} FAILED: {row['error']}")
            continue
        rate = (f"{row['TFLOPs']:7.1f} TFLOP/s" if "TFLOPs" in row
                else f"{row['GBps']:7.0f} GB/s   " if "GBps" in row else " " * 15)
        speedups = ", ".join(f"{k[len('speedup_vs_'):]} {v:.2f}x" for k, v in row.items() if k.startswith("speedup_vs_"))
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
        plot(out_dir, rows)


def plot(out_dir, rows):
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
        ("model_speedups.png", "speedup vs Hugging Face (sdpa)",
         [(r["case"], r["speedup_vs_HF sdpa"]) for r in rows if r["variant"] == "fastencoder" and "speedup_vs_HF sdpa" in r]),
        ("kernel_roofline.png", "% of the measured ceiling (matmul TFLOP/s if compute-bound, else copy GB/s)",
         [(r["case"], max(r.get("pct_of_matmul_peak", 0), r.get("pct_of_copy_bandwidth", 0)))
          for r in rows if r["group"] == "kernel" and r["variant"] == "fastencoder" and ("pct_of_matmul_peak" in r or "pct_of_copy_bandwidth" in r)]),
    )
    for filename, label, bars in charts:
        if not bars:
            continue
        figure, axis = plt.subplots(figsize=(11, 0.3 * len(bars) + 1.5))
        axis.barh([b[0] for b in bars], [b[1] for b in bars])
        axis.set_xlabel(label)
        axis.invert_yaxis()
        figure.tight_layout()
        figure.savefig(out_dir / filename, dpi=110)
        plt.close(figure)


def run(quick=False, smoke=False, out_root=Path("results"), progress=True):
    """Run the sweep and write its files; returns the results directory."""
    info = environment()
    info["mode"] = "smoke" if smoke else ("quick" if quick else "full")
    out_dir = Path(out_root) / results_dir_name(info)
    if not torch.cuda.is_available() and not smoke:
        return _run_without_gpu(info, out_dir, quick)
    settings = SMOKE if smoke else (QUICK if quick else FULL)
    rows, ceilings = [], {}
    bar = _progress(1 + 4 * len(settings["dtypes"]), progress and not smoke)
    try:
        for dtype in settings["dtypes"]:
            ceilings[_dtype_name(dtype)] = measure_ceilings(dtype) if torch.cuda.is_available() else None
        bar.update(1)
        # models first: the headline numbers, should the run be cut short
        for dtype, (group, cases) in itertools.product(settings["dtypes"], (
                ("model", model_cases), ("attention", attention_cases), ("linear", linear_cases),
                ("layer_norm", layer_norm_cases))):
            try:
                for row in cases(settings, dtype, ceilings[_dtype_name(dtype)]):
                    rows.append(row)
                    write_results(out_dir, info, add_speedups(rows), ceilings, plots=False)  # kept if cut short
            except Exception as error:  # a GPU run is scarce: keep what the other groups measure
                rows.append(_failed(group, f"every other {group} case, {_dtype_name(dtype)}", "all", error))
            bar.update(1)
    except KeyboardInterrupt:  # e.g. a time limit's SIGINT: keep and show what was measured
        info["interrupted"] = True
        rows.append(_failed("run", "every case not measured yet", "all", KeyboardInterrupt("interrupted")))
    bar.close()
    add_speedups(rows)
    write_results(out_dir, info, rows, ceilings)
    if smoke and not torch.cuda.is_available():
        print(f"smoke run on the CPU: {len(rows)} cases ran; their timings are CPU timings and are not reported")
    else:
        print(f"{info['gpu']}, torch {info['torch']}, triton {info.get('triton')}, {info['date']}")
        print("measured ceilings: " + ", ".join(
            f"{d}: {c['matmul_TFLOPs']:.0f} TFLOP/s matmul, {c['copy_GBps']:.0f} GB/s copy" for d, c in ceilings.items()))
        print(format_table(rows))
    failed = failed_rows(out_dir)
    if failed:
        print(f"{len(failed)} cases FAILED (their rows hold the error): "
              + ", ".join(f"{row['case']} / {row['variant']}" for row in failed))
    print(f"results written to {out_dir}")
    return out_dir


def failed_rows(out_dir):
    return [row for row in json.loads((Path(out_dir) / "results.json").read_text())["rows"] if "error" in row]


def _run_without_gpu(info, out_dir, quick):
    print("No CUDA GPU on this machine, so no kernel or model is timed: CPU and Triton-interpreter "
          "timings say nothing about GPU speed. Instead, the PyTorch-path model is checked against "
          "Hugging Face at a small size, and the static kernel report compiles the kernels for sm_80 "
          "and sm_90a. Run benchmarks/gpu_check.sh on a GPU machine for the numbers.")
    from fastencoder.kernels import report

    rows = [cpu_model_check()]
    for case, results, problems in report.run(quick=quick):
        rows.append(dict(group="static report", case=case["name"], variant="sm_80 / sm_90a",
                         registers="/".join(str(results[a].get("registers")) for a in report.ARCHS),
                         spill_bytes="/".join(str(results[a].get("stack")) for a in report.ARCHS),
                         hgmma=results["sm_90a"].get("hgmma"), problems="; ".join(problems)))
    write_results(out_dir, info, rows, {})
    print(format_table(rows[:1]))
    compiled = rows[1:]
    failed = [r for r in compiled if r["problems"]]
    print(f"static kernel report: {len(compiled)} kernel variants compiled for sm_80 and sm_90a, "
          f"{len(failed)} with problems{': ' + ', '.join(r['case'] for r in failed) if failed else ''}")
    print(f"results written to {out_dir}")
    return out_dir


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
