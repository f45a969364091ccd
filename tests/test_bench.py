"""The benchmark sweep's code keeps working (CI smoke run at toy sizes; timings not asserted), and
`fastencoder bench --quick` on a machine without a GPU says so and writes its files."""
import importlib.util
import json
import re
import sys

import pytest
import torch

from fastencoder.benchmarks import checkpoints, sweep


def test_smoke_sweep_runs_every_case(tmp_path):
    out = sweep.run(smoke=True, out_root=tmp_path, progress=False)
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    cases = {row["case"] for row in rows}
    assert any(case.startswith("attention") for case in cases)
    assert any(case.startswith("layer_norm") for case in cases)
    assert any(case.startswith("linear") for case in cases)
    assert any(case.startswith("bert-base") and "fwd" in case for case in cases)
    assert any(case.startswith("albert-base") for case in cases)
    # the RoBERTa family's encoder, padded and ragged (pad tokens where the mask is 0)
    assert {case for case in cases if case.startswith("xlm-roberta-base")} == {
        "xlm-roberta-base float32 fwd B2xS16 no padding", "xlm-roberta-base float32 fwd B2xS16 ragged"}
    assert not [row for row in rows if row["case"].startswith("xlm-roberta-base") and "error" in row]
    # ModernBERT-base at toy size (its GPU shapes, S = 512 to 8192, are the full sweep's)
    assert {case for case in cases if case.startswith("modernbert-base")} == {
        "modernbert-base float32 fwd B2xS16 no padding", "modernbert-base float32 fwd B2xS16 ragged"}
    assert not [row for row in rows if row["case"].startswith("modernbert-base") and "error" in row]
    assert any("fine-tune step" in case for case in cases)
    # fine-tuning as most users run it: fp32 weights under autocast bf16, fastencoder against Hugging Face
    autocast_case = "bert-base float32 autocast bfloat16 fine-tune step B2xS16"
    assert {row["variant"] for row in rows if row["case"] == autocast_case} == {"HF sdpa", "fastencoder"}
    # every case ran fastencoder and at least one baseline, and got a speedup entry per baseline
    for case in cases:
        variants = {row["variant"] for row in rows if row["case"] == case}
        assert "fastencoder" in variants and len(variants) >= 2, case
        ours = next(row for row in rows if row["case"] == case and row["variant"] == "fastencoder")
        assert {f"speedup_vs_{v}" for v in variants - {"fastencoder"}} <= set(ours)
    assert (out / "results.csv").read_text().startswith("group,case,variant")
    threshold_case = "bert-base float32 fwd B2xS16 25% padding"
    assert {row["variant"] for row in rows if row["case"] == threshold_case} == {"fastencoder", "fastencoder unpad"}
    graph_rows = [row for row in rows if row["variant"] == "fastencoder cuda graphs"]
    assert graph_rows, "the CUDA-graph variant runs in every model case"
    if not torch.cuda.is_available():  # nothing replayed on the CPU, and the rows say so
        assert all(row["ran_eagerly"] == "CUDA graphs need input_ids on a CUDA device" for row in graph_rows)
    assert results["environment"]["mode"] == "smoke"


def test_a_failing_case_is_recorded_and_the_rest_still_runs(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("broke")

    build_models = sweep.build_models

    def with_a_broken_baseline(*args, **kwargs):
        config, models = build_models(*args, **kwargs)
        # MPNet's eager model is its reference: it stays whole (ModernBERT's baseline is SDPA alone)
        if "HF sdpa" in models and "HF eager" in models:
            models["HF eager"].forward = broken
        return config, models

    monkeypatch.setattr(sweep, "layer_norm_cases", broken)
    monkeypatch.setattr(sweep, "build_models", with_a_broken_baseline)
    out = sweep.run(smoke=True, out_root=tmp_path, progress=False)
    failed = sweep.failed_rows(out)
    assert {(row["group"], row["variant"]) for row in failed} == {("layer_norm", "all"), ("model", "HF eager")}
    assert all(row["error"] == "RuntimeError: broke" for row in failed)
    rows = json.loads((out / "results.json").read_text())["rows"]
    timed = [row for row in rows if "median_ms" in row]
    assert {row["group"] for row in timed} == {"kernel", "model"}
    assert not any("speedup_vs_HF eager" in row for row in timed if not row["case"].startswith("mpnet"))
    assert any("speedup_vs_HF sdpa" in row for row in timed)


def test_a_run_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    """A time limit's SIGINT (KeyboardInterrupt) after the model cases: their rows are written."""
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "attention_cases", interrupted)
    out = sweep.run(smoke=True, out_root=tmp_path, progress=False)
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["interrupted"] is True
    assert [row["group"] for row in sweep.failed_rows(out)] == ["run"]
    assert {row["group"] for row in results["rows"] if "median_ms" in row} == {"model"}


def test_without_matplotlib_there_are_no_plots_and_no_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    row = dict(group="model", case="c", variant="fastencoder", median_ms=1.0, **{"speedup_vs_HF sdpa": 2.0})
    sweep.plot(tmp_path, [row])
    assert "no plots" in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_each_hugging_face_baseline_keeps_its_attention_implementation():
    _, models = sweep.build_models("bert-base", torch.float32, sweep.SMOKE["model_overrides"], compile_baseline=False)
    assert models["HF eager"].config._attn_implementation == "eager"
    assert models["HF sdpa"].config._attn_implementation == "sdpa"


@pytest.mark.parametrize("batch, seqlen, fraction", [(32, 128, 0.02), (32, 384, 0.3), (2, 16, 0.25), (3, 5, 0.5)])
def test_lengths_with_padding(batch, seqlen, fraction):
    lengths = sweep.lengths_with_padding(batch, seqlen, fraction)
    assert len(lengths) == batch and lengths[0] == seqlen and min(lengths) >= 1
    assert batch * seqlen - sum(lengths) == round(fraction * batch * seqlen)
    assert max(lengths[1:]) - min(lengths[1:]) <= 1, "the padding is spread evenly"


def test_lengths_with_padding_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="cannot pad 90% of B2xS16"):
        sweep.lengths_with_padding(2, 16, 0.9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without a GPU")
def test_bench_without_gpu_times_the_models_on_the_cpu(tmp_path, capsys):
    """The CPU sweep (its test preset: a 1-layer random model; the encode case with the real
    all-MiniLM-L6-v2 when its packages are installed): every variant timed, checked first,
    compared by ratios of medians, written as JSON, CSV and a plot labelled CPU."""
    out = sweep.run(out_root=tmp_path, progress=False, cpu_settings=sweep.CPU_SMOKE)
    printed = capsys.readouterr().out
    assert "No CUDA GPU on this machine: the models run on the CPU" in printed and "These are CPU figures" in printed
    assert out.name.startswith("cpu_torch-")
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["mode"] == "cpu" and results["environment"]["gpu"] is None
    rows = results["rows"]
    assert not [row for row in rows if "error" in row]
    variants = {"HF eager", "HF sdpa", "fastencoder", "fastencoder padded", "fastencoder unpad", "fastencoder unpad=auto"}
    for case in ("minilm-l6 (random weights) float32 fwd B2xS16 no padding",
                 "minilm-l6 (random weights) float32 fwd B2xS16 25% padding"):
        case_rows = {row["variant"]: row for row in rows if row["case"] == case}
        assert set(case_rows) == variants, case
        for variant in variants - {"HF eager", "HF sdpa"}:
            mine = case_rows[variant]
            assert mine["speedup_vs_HF sdpa"] == case_rows["HF sdpa"]["median_ms"] / mine["median_ms"]
            assert mine["cpu_time_speedup_vs_HF sdpa"] > 0 and mine["rounds"] >= 2
    for case in ("xlm-roberta minilm-l6 size float32 fwd B2xS16 no padding",
                 "xlm-roberta minilm-l6 size float32 fwd B2xS16 25% padding"):
        case_rows = {row["variant"]: row for row in rows if row["case"] == case}
        assert set(case_rows) == {"HF sdpa", "fastencoder"}, case
        assert case_rows["fastencoder"]["speedup_vs_HF sdpa"] > 0
    for case in ("modernbert hidden-64 1-layer float32 fwd B2xS16 no padding",
                 "modernbert hidden-64 1-layer float32 fwd B2xS16 25% padding"):
        case_rows = {row["variant"]: row for row in rows if row["case"] == case}
        assert set(case_rows) == {"HF sdpa", "fastencoder"}, case
        assert case_rows["fastencoder"]["speedup_vs_HF sdpa"] > 0
    host = {row["variant"]: row for row in rows if row["group"] == "host"}
    assert set(host) == {"HF sdpa", "fastencoder"} and all(row["us_per_layer"] for row in host.values())
    if checkpoints.minilm_checkpoint() is not None and importlib.util.find_spec("sentence_transformers"):
        encode = {row["variant"] for row in rows if row["group"] == "encode"}
        assert encode == {"HF sdpa", "fastencoder", "fastencoder unpad=auto"}
        rerank = {row["variant"]: row for row in rows if row["group"] == "rerank"}
        assert set(rerank) == {"HF sdpa", "fastencoder"} and rerank["fastencoder"]["speedup_vs_HF sdpa"] > 0
    assert (out / "results.csv").read_text().startswith("group,case,variant")
    assert (out / "model_speedups.png").exists()
    assert "speedups are ratios of medians" in printed and " ms " in printed


def test_a_fast_wrong_answer_fails_its_row_untimed(tmp_path, monkeypatch):
    """A fastencoder model whose output differs from Hugging Face's (here: a LayerNorm weight
    changed behind its back) fails its rows with the difference, and no speed is reported."""
    build_models = sweep.build_models

    def with_a_wrong_model(*args, **kwargs):
        config, models = build_models(*args, **kwargs)
        layer_norm_weight = next(parameter for name, parameter in models["fastencoder unpad"].named_parameters()
                                 if name.endswith(("LayerNorm.weight", "mlp_norm.weight")) and "embeddings" not in name)
        with torch.no_grad():
            layer_norm_weight.add_(1.0)
        return config, models

    monkeypatch.setattr(sweep, "build_models", with_a_wrong_model)
    out = sweep.run(smoke=True, out_root=tmp_path, progress=False)
    wrong = [row for row in json.loads((out / "results.json").read_text())["rows"]
             if row["variant"] == "fastencoder unpad"]
    assert wrong and all("median_ms" not in row for row in wrong)
    assert all(re.match(r"OutputMismatch: output differs from HF (sdpa|eager)'s: max \|diff\|", row["error"])
               for row in wrong)
    assert {row["variant"] for row in sweep.failed_rows(out)} == {"fastencoder unpad"}


def test_check_output_tolerates_rounding_and_refuses_nan():
    expected = torch.randn(4, 8)
    sweep.check_output(expected + 1e-3, expected, torch.float32, "HF sdpa")
    with_nan = expected.clone()
    with_nan[1, 2] = float("nan")
    for wrong in (expected + 1e-2, with_nan):
        with pytest.raises(sweep.OutputMismatch, match="output differs from HF sdpa's"):
            sweep.check_output(wrong, expected, torch.float32, "HF sdpa")


def test_readme_performance_section_comes_from_the_newest_gpu_run(tmp_path):
    from fastencoder.benchmarks import readme

    readme_file = tmp_path / "README.md"
    readme_file.write_text(f"intro\n{readme.START}\nold\n{readme.END}\nrest\n")
    results = tmp_path / "results"
    readme.update_readme(readme_file, results)
    assert readme.NO_RUN in readme_file.read_text() and "old" not in readme_file.read_text()

    def run(date, gpu, ms):
        case = "bert-base float16 fwd B32xS128 ragged"
        rows = [dict(group="model", case=case, variant="HF sdpa", median_ms=2 * ms),
                dict(group="model", case=case, variant="fastencoder", median_ms=ms, tokens_per_s=4096 / ms * 1e3,
                     **{"speedup_vs_HF sdpa": 2.0}),
                dict(group="model", case=case, variant="fastencoder unpad", median_ms=ms / 2,
                     tokens_per_s=8192 / ms * 1e3, **{"speedup_vs_HF sdpa": 4.0, "speedup_vs_fastencoder": 2.0})]
        return dict(environment=dict(date=date, gpu=gpu, torch="2.11", triton="3.6", mode="quick"),
                    ceilings={"float16": dict(matmul_TFLOPs=790.0, copy_GBps=4300.0)}, rows=rows)

    for name, content in (("a", run("2026-12-01", "NVIDIA H200", 1.25)), ("b", run("2026-12-02", "NVIDIA H200", 1.10)),
                          ("c", run("2026-12-03", None, 99.0))):  # a CPU run never counts
        (results / name).mkdir(parents=True)
        (results / name / "results.json").write_text(json.dumps(content))
    readme.update_readme(readme_file, results)
    text = readme_file.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n")
    assert "Measured on NVIDIA H200 (2026-12-02" in text and "790 TFLOP/s matmul" in text
    assert "| bert-base float16 fwd B32xS128 ragged | padded | 1.100 | - | 2.00x | - | - | 3723636 tokens/s |" in text
    assert "| bert-base float16 fwd B32xS128 ragged | unpad | 0.550 | - | 4.00x | - | 2.00x | 7447273 tokens/s |" in text
    assert "HF sdpa |" not in text.replace("vs HF sdpa |", ""), "baseline rows are columns, not rows"


def test_readme_shows_cpu_figures_apart_and_never_a_failed_rows_speed(tmp_path):
    from fastencoder.benchmarks import readme

    readme_file = tmp_path / "README.md"
    readme_file.write_text(f"intro\n{readme.START}\nold\n{readme.END}\nrest\n")
    case = "all-MiniLM-L6-v2 float32 fwd B32xS128 50% padding"
    rows = [dict(group="model", case=case, variant="HF sdpa", median_ms=300.0, rounds=9),
            dict(group="model", case=case, variant="fastencoder", median_ms=200.0, tokens_per_s=12345.0, rounds=9,
                 **{"speedup_vs_HF sdpa": 1.5, "cpu_time_speedup_vs_HF sdpa": 1.52, "speedup_vs_HF eager": 2.0}),
            dict(group="model", case=case, variant="fastencoder unpad", error="OutputMismatch: output differs"),
            dict(group="host", case="host time per layer", variant="fastencoder", median_ms=0.1, us_per_layer=100.0,
                 **{"speedup_vs_HF sdpa": 1.1})]
    environment = dict(date="2026-11-29", gpu=None, cpu="x86_64", cpu_threads=2, torch="2.13", mode="cpu")
    for name, mode in (("cpu", "cpu"), ("smoke", "smoke")):  # a smoke run never counts
        (tmp_path / "results" / name).mkdir(parents=True)
        (tmp_path / "results" / name / "results.json").write_text(json.dumps(dict(
            environment=dict(environment, mode=mode, date="2026-11-30" if mode == "smoke" else "2026-11-29"),
            ceilings={}, rows=rows if mode == "cpu" else [])))
    readme.update_readme(readme_file, tmp_path / "results")
    text = readme_file.read_text()
    assert readme.NO_RUN in text, "GPU figures are pending, said first"
    assert text.index(readme.NO_RUN) < text.index("**CPU figures** (x86_64, 2 threads, 2026-11-29")
    assert f"| {case} | default | 200.0 | 2.00x | 1.50x (1.52x) | 12345 tokens/s |" in text
    assert f"| {case} | unpad | failed: OutputMismatch: output differs | | | |" in text
    assert "| host time per layer | default | 100.0 µs per layer | - | 1.10x | host time (fastest rounds) |" in text
    assert "HF sdpa |" not in text.replace("vs HF sdpa |", ""), "baseline rows are columns, not rows"
