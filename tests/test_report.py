"""The static kernel report: every kernel variant compiles for sm_80 and sm_90a, with no spills and
(for matmul-class kernels) wgmma on sm_90a. Runs without a GPU."""
import os
import subprocess
import sys

import pytest

from fastencoder.kernels import report


@pytest.mark.parametrize("kernel", report.KERNEL_MODULES)
def test_every_variant_compiles_without_spills(kernel, tmp_path):
    # the report compiles real GPU code: the interpreter must be off when kernels are defined
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    table = tmp_path / "report.md"
    result = subprocess.run(
        [sys.executable, "-m", "fastencoder.kernels.report", "--filter", kernel, "--markdown", str(table)],
        env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = [line for line in table.read_text().splitlines() if line.startswith(f"| {kernel}")]
    assert rows and all(line.endswith("| yes |") for line in rows)


def test_problems_are_reported():
    case = dict(matmul=True)
    clean = dict(registers=128, stack=0, local=0, shared=1024, hgmma=4)
    assert report.problems(case, {"sm_80": dict(clean, hgmma=None), "sm_90a": clean}) == []
    found = report.problems(case, {"sm_80": dict(clean, stack=16), "sm_90a": dict(clean, hgmma=0)})
    assert found == ["sm_80: spills (16 stack bytes, 0 local)", "sm_90a: no HGMMA in the SASS of a matmul-class kernel"]
    assert report.problems(case, {"sm_80": {"error": "boom"}, "sm_90a": clean}) == ["sm_80: compile failed: boom"]
