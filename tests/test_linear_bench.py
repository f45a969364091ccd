"""The GEMM table of `fastencoder bench` (benchmarks/gemm.py) keeps working: its smoke preset runs
every candidate (interpreted kernels, torch's CPU GEMM as "cuBLAS") and checks each output, and the
table prints every variant with its ratio to cuBLAS plain and what the choice kept. Timings here are
CPU timings of interpreted kernels and mean nothing."""
import torch

from fastencoder.benchmarks import gemm, sweep


def _rows():
    return list(gemm.gemm_cases(gemm.SMOKE, torch.float32, None, sweep._row, sweep._failed, sweep.check_output,
                                sweep.OutputMismatch))


def test_the_smoke_preset_runs_every_candidate_of_every_gemm(triton_backend, kernel_launches):
    rows = _rows()
    assert not [row for row in rows if "error" in row], [row for row in rows if "error" in row]
    cases = {}
    for row in rows:
        cases.setdefault(row["case"], set()).add(row["variant"])
    # every layer's forward, and the backward products of BERT's FFN (its GELU layer)
    assert len(cases) == sum(len(layers) for layers in gemm.SMOKE_LAYERS.values()) + 2
    assert any(" dx " in case for case in cases) and any(" dW " in case for case in cases)
    assert any("(geglu) forward" in case for case in cases)
    # off sm_90 there is no Hopper row
    assert all(variants == {"fastencoder", "fastencoder classic", "cuBLAS + epilogue", "cuBLAS plain"}
               for variants in cases.values())
    assert all(row["TFLOPs"] > 0 for row in rows)
    assert {"_linear_kernel", "_epilogue_kernel"} <= set(kernel_launches)


def test_the_table_shows_ratios_and_the_choice():
    timing = dict(median_ms=1.0, iqr_ms=0.0)
    case = "gemm bert-base ffn in (bias+gelu) forward M4096 N3072 K768 float16"
    flops = 2 * 4096 * 3072 * 768
    rows = [sweep._row("kernel", case, gemm.PLAIN, timing, flops),
            sweep._row("kernel", case, "fastencoder classic", dict(timing, median_ms=2.0), flops),
            sweep._row("kernel", case, "fastencoder", dict(timing, median_ms=0.8), flops, choice="hopper",
                       choice_times_ms={"classic": 2.0, "hopper": 0.8, "cublas": 1.1}),
            sweep._failed("kernel", case, "cuBLAS + epilogue", RuntimeError("boom")),
            sweep._row("kernel", "something else", "fastencoder", timing, flops)]
    table = gemm.format_table(rows).splitlines()
    assert len(table) == 3 and table[2].startswith(case)
    assert "(0.50x)" in table[2] and "(1.25x)" in table[2] and "(1.00x)" in table[2] and "FAILED" in table[2]
    assert table[2].endswith("hopper (classic 2.000 ms, hopper 0.800 ms, cublas 1.100 ms)")
    assert gemm.format_table(rows[-1:]) == ""


def test_the_sweep_runs_the_gemm_table_in_every_preset():
    assert sweep.FULL["gemm"]["tokens"] == [4096, 16384] and sweep.FULL["gemm"]["dtypes"] == [torch.float16,
                                                                                             torch.bfloat16]
    assert sweep.QUICK["gemm"]["tokens"] == [4096] and sweep.SMOKE["gemm"] is gemm.SMOKE
