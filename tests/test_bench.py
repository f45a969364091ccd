"""The benchmark sweep's code keeps working (CI smoke run at toy sizes; timings not asserted), and
`fastencoder bench --quick` on a machine without a GPU says so and writes its files."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastencoder.benchmarks import sweep


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
    assert results["environment"]["mode"] == "smoke"


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
    assert any(row["group"] == "static report" and not row["problems"] for row in rows[1:])
