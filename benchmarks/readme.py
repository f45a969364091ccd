"""The README's performance section, generated from the newest GPU run in benchmarks/results/.

    python -m fastencoder.benchmarks.readme [README.md] [benchmarks/results]

Rewrites what stands between the two markers below; with no GPU run checked in, says so.
"""
import json
import sys
from pathlib import Path

START, END = "<!-- performance:start -->", "<!-- performance:end -->"
NO_RUN = ("**No GPU run has been recorded yet**: every speed figure is pending, and fastencoder makes no "
          "speed claim until `benchmarks/gpu_check.sh` has run on a GPU and its results are checked in.")


def newest_gpu_run(results_root):
    """The results.json of the newest run that has a GPU, or None."""
    runs = [json.loads(path.read_text()) for path in Path(results_root).glob("*/results.json")]
    runs = [run for run in runs if run["environment"].get("gpu")]
    return max(runs, key=lambda run: run["environment"]["date"], default=None)


def render(run):
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
        speedup = lambda name: f"{row[f'speedup_vs_{name}']:.2f}x" if f"speedup_vs_{name}" in row else "-"
        rate = (f"{row['TFLOPs']:.0f} TFLOP/s" if "TFLOPs" in row else f"{row['GBps']:.0f} GB/s" if "GBps" in row
                else f"{row.get('tokens_per_s', 0):.0f} tokens/s")
        variant = row["variant"].removeprefix("fastencoder").strip() or "padded"
        if "ran_eagerly" in row:
            variant += f" (ran eagerly: {row['ran_eagerly']})"
        lines.append(f"| {row['case']} | {variant} | {row['median_ms']:.3f} | {speedup('HF eager')} | "
                     f"{speedup('HF sdpa')} | {speedup('torch.compile(HF sdpa)')} | {speedup('fastencoder')} | {rate} |")
    return "\n".join(lines)


def update_readme(readme, results_root):
    text = Path(readme).read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    Path(readme).write_text(f"{before}{START}\n{render(newest_gpu_run(results_root))}\n{END}{after}")


if __name__ == "__main__":
    arguments = sys.argv[1:] + ["README.md", "benchmarks/results"][len(sys.argv[1:]):]
    update_readme(*arguments[:2])
