"""The README's performance section, generated from the newest runs in benchmarks/results/: the
newest GPU run, then the newest CPU run, each in its own table (GPU and CPU figures are never mixed).

    python -m fastencoder.benchmarks.readme [README.md] [benchmarks/results]

Rewrites what stands between the two markers below. A row that failed its output check (or failed
to run) shows its error, never a speed.
"""
import json
import sys
from pathlib import Path

START, END = "<!-- performance:start -->", "<!-- performance:end -->"
NO_RUN = ("**No GPU run has been recorded yet**: every GPU speed figure is pending, and fastencoder makes no "
          "GPU speed claim until `benchmarks/gpu_check.sh` has run on a GPU and its results are checked in.")
CPU_MODES = ("cpu", "cpu quick")


def _runs(results_root):
    return [json.loads(path.read_text()) for path in Path(results_root).glob("*/results.json")]


def newest_gpu_run(results_root):
    """The results.json of the newest run that has a GPU, or None."""
    runs = [run for run in _runs(results_root) if run["environment"].get("gpu")]
    return max(runs, key=lambda run: run["environment"]["date"], default=None)


def newest_cpu_run(results_root):
    """The results.json of the newest CPU sweep (not a smoke run), or None."""
    runs = [run for run in _runs(results_root)
            if not run["environment"].get("gpu") and run["environment"].get("mode") in CPU_MODES]
    return max(runs, key=lambda run: run["environment"]["date"], default=None)


def _threads(info):
    threads = info.get("cpu_threads", "?")
    return f"{threads} thread{'' if threads == 1 else 's'}"


def _default_unpad(info):
    default = info.get("default_unpad")
    return "" if default is None else f" (unpad={json.dumps(default) if isinstance(default, str) else default})"


def _load(info):
    load = info.get("load_average")
    return "" if load is None else f"load average {load:.1f} when the run began; "


def _speedup(row, baseline):
    key = f"speedup_vs_{baseline}"
    return f"{row[key]:.2f}x" if key in row else "-"


def render(run):
    """The GPU table (or the note that GPU figures are pending)."""
    if run is None:
        return NO_RUN
    info = run["environment"]
    lines = [
        f"Measured on {info['gpu']} ({info['date']}; torch {info['torch']}, triton {info.get('triton')}, "
        f"{info['mode']} sweep{', cut short: partial' if info.get('interrupted') else ''}). "
        "Ceilings measured in the same run: "
        + ", ".join(f"{dtype}: {c['matmul_TFLOPs']:.0f} TFLOP/s matmul, {c['copy_GBps']:.0f} GB/s copy"
                    for dtype, c in run["ceilings"].items()) + ".",
        "",
        "| case | fastencoder variant | ms | vs HF eager | vs HF sdpa | vs torch.compile(HF sdpa) | "
        "vs fastencoder padded | rate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in run["rows"]:
        if not row["variant"].startswith("fastencoder"):
            continue
        if "error" in row:
            lines.append(f"| {row['case']} | {row['variant']} | failed: {row['error']} | | | | | |")
            continue
        rate = (f"{row['TFLOPs']:.0f} TFLOP/s" if "TFLOPs" in row else f"{row['GBps']:.0f} GB/s" if "GBps" in row
                else f"{row.get('tokens_per_s', 0):.0f} tokens/s")
        variant = row["variant"].removeprefix("fastencoder").strip() or "padded"
        if "ran_eagerly" in row:
            variant += f" (ran eagerly: {row['ran_eagerly']})"
        lines.append(f"| {row['case']} | {variant} | {row['median_ms']:.3f} | {_speedup(row, 'HF eager')} | "
                     f"{_speedup(row, 'HF sdpa')} | {_speedup(row, 'torch.compile(HF sdpa)')} | "
                     f"{_speedup(row, 'fastencoder')} | {rate} |")
    return "\n".join(lines)


def render_cpu(run):
    """The CPU table, labelled as such; empty without a CPU run."""
    if run is None:
        return ""
    info = run["environment"]
    rounds = max((row.get("rounds", 0) for row in run["rows"]), default=0)
    lines = [
        f"**CPU figures** ({info.get('cpu') or 'CPU'}, {_threads(info)}, {info['date']}; "
        f"{_load(info)}"
        f"torch {info['torch']}, transformers {info.get('transformers')}; {info['mode']} sweep"
        f"{', cut short: partial' if info.get('interrupted') else ''}). fp32 on fastencoder's PyTorch path, "
        f"every variant of a case timed side by side, interleaved over up to {rounds} rounds; speedups are "
        "ratios of medians, of wall-clock time and (in brackets) of the CPU time the process used, which "
        "waiting for a busy core does not inflate. `default` is `optimize(model)` at its defaults"
        f"{_default_unpad(info)}, `padded` is `unpad=False`, `unpad` is `unpad=True`, `unpad=auto` is "
        "`unpad=\"auto\"`.",
        "",
        "| case | fastencoder variant | ms | vs HF eager | vs HF sdpa | rate |",
        "|---|---|---|---|---|---|",
    ]
    for row in run["rows"]:
        if not row["variant"].startswith("fastencoder"):
            continue
        variant = row["variant"].removeprefix("fastencoder").strip() or "default"
        if "error" in row:
            lines.append(f"| {row['case']} | {variant} | failed: {row['error']} | | | |")
            continue
        if "us_per_layer" in row:
            time, rate = f"{row['us_per_layer']:.1f} µs per layer", "host time (fastest rounds)"
        else:
            time, rate = f"{row['median_ms']:.1f}", f"{row.get('tokens_per_s', 0):.0f} tokens/s"
        cpu_time = f" ({row['cpu_time_speedup_vs_HF sdpa']:.2f}x)" if "cpu_time_speedup_vs_HF sdpa" in row else ""
        lines.append(f"| {row['case']} | {variant} | {time} | {_speedup(row, 'HF eager')} | "
                     f"{_speedup(row, 'HF sdpa')}{cpu_time} | {rate} |")
    return "\n".join(lines)


def update_readme(readme, results_root):
    text = Path(readme).read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    sections = [render(newest_gpu_run(results_root)), render_cpu(newest_cpu_run(results_root))]
    body = "\n\n".join(section for section in sections if section)
    Path(readme).write_text(f"{before}{START}\n{body}\n{END}{after}")


if __name__ == "__main__":
    arguments = sys.argv[1:] + ["README.md", "benchmarks/results"][len(sys.argv[1:]):]
    update_readme(*arguments[:2])
