"""The comparison's outputs: compare.json, a table (terminal and compare.md) and plots."""
import json
import statistics

from .experiment import NAMES
from .seeds import METRICS, value, verdict

SMOOTHING = 10  # steps averaged for the start and end losses and the smoothed curves


def _mean(values):
    return sum(values) / len(values)


def _percent(value):
    return f"{100 * value:.1f} %"


def _count(value):
    return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{value / 1e3:.1f} k"


def _stat(model, metric, show):
    """The mean of a metric over the seeds, ± its standard deviation where there are several."""
    spread = model["spread"][metric]
    return show(value(model, metric)) + ("" if spread is None else f" ± {show(spread)}")


def _points(value):
    return f"{100 * value:.1f}"


def table(result, data):
    """The headline numbers as a Markdown table (mean ± standard deviation over the seeds)."""
    models = result["models"]
    bert, albert = models["bert"], models["albert"]
    window = lambda m: min(SMOOTHING, len(m["pretraining"]["loss"]))
    loss = lambda m: (f"{_mean(m['pretraining']['loss'][:window(m)]):.2f} → "
                      f"{_mean(m['pretraining']['loss'][-window(m):]):.2f}")
    memory = lambda m: ("n/a" if m["pretraining"]["peak_memory_bytes"] is None
                        else f"{m['pretraining']['peak_memory_bytes'] / 2**30:.2f} GiB")
    percent = lambda metric: lambda m: _stat(m, metric, _points) + " %"
    qa_baselines = data["qa"]["baselines"]
    rows = [
        ("parameters: total", lambda m: _count(m["parameters"]["total"])),
        ("parameters: embeddings", lambda m: _count(m["parameters"]["embeddings"])),
        ("parameters: encoder", lambda m: _count(m["parameters"]["encoder"])),
        ("pretraining objective", lambda m: m["pretraining"]["objective"].upper()),
        (f"pretraining loss (mean of first → last {SMOOTHING} steps)", loss),
        ("MLM accuracy (held-out documents)", percent("pretraining.mlm_accuracy")),
        ("MLM unigram baseline (the commonest token everywhere)",
         lambda m: _percent(m["pretraining"]["mlm_unigram_baseline"])),
        ("NSP / SOP accuracy (held-out documents)", percent("pretraining.pair_accuracy")),
        ("NSP / SOP chance (the commonest label)", lambda m: _percent(m["pretraining"]["pair_baseline"])),
        (f"classification accuracy (majority baseline {_percent(bert['classification']['majority_baseline'])})",
         percent("classification.accuracy")),
        ("QA exact match" + (" (trivial baselines: " + ", ".join(
            f"{name.replace('_', ' ')} {_percent(value)}" for name, value in qa_baselines.items()) + ")"
            if qa_baselines else ""), percent("qa.exact_match")),
        ("QA F1", percent("qa.f1")),
        (f"pretraining tokens/s ({result['environment']['device']}; measured, not a speed claim)",
         lambda m: _stat(m, "pretraining.tokens_per_s", lambda v: f"{v:,.0f}")),
        ("pretraining peak memory", memory),
    ]
    lines = ["| | BERT | ALBERT |", "|---|---:|---:|"]
    lines += [f"| {label} | {cell(bert)} | {cell(albert)} |" for label, cell in rows]
    return "\n".join(lines)


def verdicts(result):
    """One line per metric: does BERT's and ALBERT's difference exceed their spread?"""
    seeds = len(result["seeds"])
    return [f"Verdicts over {seeds} seed{'s' * (seeds > 1)} (a difference counts where it exceeds the sum "
            "of the two models' standard deviations):", ""] + [
        f"- {verdict(metric, result['models'], NAMES)}" for metric in METRICS]


def markdown(result, data, preset, seconds):
    environment = result["environment"]
    bert = result["models"]["bert"]
    classification, qa = data["classification"], data["qa"]
    corpus = data["corpus"]
    lines = [
        f"# BERT vs ALBERT: preset `{result['preset']}`",
        "",
        f"{environment['device']}, {environment['dtype']}, {environment['ops']}; torch {environment['torch']}, "
        f"transformers {environment['transformers']}. Wall time {sum(seconds.values()):.0f} s "
        f"({', '.join(f'{name} {value:.0f} s' for name, value in seconds.items())}).",
        "",
        table(result, data),
        "",
        *verdicts(result),
        "",
        "![pretraining loss](pretraining_loss.png)",
        "![metrics](metrics.png)",
        "",
        "## Setup",
        "",
        f"- Corpus: {corpus['source']}: {corpus['documents']} documents, {corpus['tokens']:,} tokens, "
        f"{corpus['held_out_documents']} documents held out for evaluation; WordPiece vocabulary of "
        f"{corpus['vocab_size']} tokens.",
        f"- Pretraining: {bert['pretraining']['steps']} steps of {preset.batch_size} sentence pairs of up to "
        f"{preset.max_length} tokens ({corpus['pairs']} pairs, new masks each epoch); AdamW, learning rate "
        f"{preset.learning_rate:g}, linear warm-up over {preset.warmup_share:.0%} of the steps and linear decay; "
        f"dropout {preset.dropout:g}. Same data order, budget, optimiser and schedule for both models.",
        f"- Models: {preset.num_hidden_layers} layers, hidden size {preset.hidden_size}, "
        f"{preset.num_attention_heads} heads, FFN {preset.intermediate_size}; ALBERT's embeddings "
        f"{preset.embedding_size} wide and one layer's parameters shared by all layers.",
        f"- Classification: {classification['name']}, {classification['sizes'][0]} training and "
        f"{classification['sizes'][1]} evaluation examples; fine-tuned {bert['classification']['steps']} steps.",
        f"- Question answering: {qa['name']}, {qa['sizes'][0]} training and {qa['sizes'][1]} evaluation "
        f"questions; fine-tuned {bert['qa']['steps']} steps.",
        f"- Fine-tuning: batches of {preset.fine_tune_batch_size}, AdamW, learning rate "
        f"{preset.fine_tune_learning_rate:g}, the same warm-up and decay as pretraining.",
        f"- Seeds: {', '.join(map(str, result['seeds']))} (initialisation and data order; the data is the same "
        "for every seed); the table gives the mean ± the standard deviation over the seeds.",
        "",
        "Evaluation examples:",
        "",
    ]
    for text, label in classification["examples"]:
        lines.append(f"- classification, label `{classification['labels'][label]}`: {text}")
    for example in qa["examples"]:
        lines.append(f"- QA: {example['question']} → `{example['answers'][0]['text']}` in: {example['context']}")
    return "\n".join(lines) + "\n"


def plots(result, out):
    """pretraining_loss.png and metrics.png; returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = result["models"]
    figure, axes = plt.subplots(figsize=(7, 4))
    smoothed = lambda loss: [_mean(loss[max(0, i - min(SMOOTHING, len(loss)) + 1):i + 1]) for i in range(len(loss))]
    for kind, color in (("bert", "tab:blue"), ("albert", "tab:orange")):
        loss = models[kind]["pretraining"]["loss"]
        steps = range(1, len(loss) + 1)
        label = f"{NAMES[kind]} ({models[kind]['pretraining']['objective'].upper()})"
        axes.plot(steps, loss, color=color, alpha=0.25, linewidth=0.8)
        axes.plot(steps, smoothed(loss), color=color, label=label)
        runs = [smoothed(run["pretraining"]["loss"]) for run in models[kind]["runs"]]
        if len(runs) > 1:  # ± the standard deviation over the seeds
            mean, spread = smoothed(loss), [statistics.stdev(column) for column in zip(*runs)]
            axes.fill_between(steps, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)],
                              color=color, alpha=0.15, linewidth=0)
    axes.set_xlabel("step")
    axes.set_ylabel("pretraining loss (MLM + pair)")
    axes.set_title(f"Pretraining loss, preset {result['preset']} ({result['environment']['device']})", fontsize=9)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "pretraining_loss.png", dpi=120)
    plt.close(figure)

    metrics = [("MLM acc.", "pretraining.mlm_accuracy"), ("NSP / SOP acc.", "pretraining.pair_accuracy"),
               ("classification acc.", "classification.accuracy"), ("QA exact match", "qa.exact_match"),
               ("QA F1", "qa.f1")]
    figure, axes = plt.subplots(figsize=(7, 4))
    width = 0.38
    for offset, (kind, color) in zip((-width / 2, width / 2), (("bert", "tab:blue"), ("albert", "tab:orange"))):
        values = [value(models[kind], metric) for _, metric in metrics]
        spreads = [models[kind]["spread"][metric] or 0.0 for _, metric in metrics]
        bars = axes.bar([i + offset for i in range(len(metrics))], values, width, yerr=spreads, capsize=3,
                        color=color, label=NAMES[kind])
        axes.bar_label(bars, labels=[f"{100 * v:.0f}" for v in values], fontsize=7)
    # the baselines that need no model: the higher of the two models' (they differ only by objective)
    best_qa_baseline = max(models["bert"]["qa"]["trivial_baselines"].values(), default=None)
    baselines = [max(m["pretraining"]["mlm_unigram_baseline"] for m in models.values()),
                 max(m["pretraining"]["pair_baseline"] for m in models.values()),
                 models["bert"]["classification"]["majority_baseline"], best_qa_baseline]
    for index, baseline in enumerate(baselines):
        if baseline is not None:
            axes.hlines(baseline, index - 0.45, index + 0.45, colors="black", linestyles="dashed",
                        label="baseline without a model" if index == 0 else None)
    axes.set_xticks(range(len(metrics)), [name for name, _ in metrics], fontsize=8)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("held-out score")
    seeds = len(result["seeds"])
    axes.set_title(f"Final metrics, preset {result['preset']}" + (f" (mean ± standard deviation over {seeds} seeds)"
                                                               if seeds > 1 else ""), fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "metrics.png", dpi=120)
    plt.close(figure)
    return True


def write(result, data, preset, seconds, out):
    (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "compare.md").write_text(markdown(result, data, preset, seconds))
    plotted = plots(result, out)
    print()
    print(table(result, data))
    print("\n".join(["", *verdicts(result)]))
    print(f"\nwrote {out / 'compare.json'}, {out / 'compare.md'}"
          + (", pretraining_loss.png, metrics.png" if plotted else " (no plots: matplotlib is not installed)"))
