"""The benchmark sweep's code keeps working (CI smoke run at toy sizes; timings not asserted), and
`fastencoder bench --quick` on a machine without a GPU says so and writes its files."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastencoder.benchmarks import sweep
from fastencoder.kernels import report


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
    assert any("fine-tune step" in case for case in cases)
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
    assert not any("speedup_vs_HF eager" in row for row in timed)
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
def test_quick_bench_without_gpu_explains_and_writes_files(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "fastencoder", "bench", "--quick", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "No CUDA GPU on this machine, so no kernel or model is timed" in result.stdout
    assert " ms " not in result.stdout  # no CPU timing is presented
    (out,) = tmp_path.iterdir()
    assert out.name.startswith("cpu_torch-")
    rows = json.loads((out / "results.json").read_text())["rows"]
    check = rows[0]
    assert check["group"] == "check" and check["max_abs_diff"] < 1e-4
    # the quick report compiles one variant of every kernel, each for both architectures, cleanly
    compiled = [row for row in rows[1:] if row["group"] == "static report"]
    kernels = {case["fn"].__name__ for case in report.all_cases()}
    assert len(compiled) == len(rows) - 1 == len(kernels)
    assert [row["case"] for row in compiled if row["problems"]] == []
    assert all("None" not in row["registers"] for row in compiled)


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
