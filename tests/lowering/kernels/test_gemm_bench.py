"""The GEMM benchmark's measurement and table code on tiny shapes (timing replaced by one call)."""

import pytest

from qcompile import gemm_bench

from .helpers import DEVICE, needs_kernels

pytestmark = needs_kernels


def test_bench_rows_and_table(monkeypatch):
    calls = []

    def fake_bench(fn, warmup, rep):
        calls.append(fn())
        return 1.0

    monkeypatch.setattr(gemm_bench, "_bench", fake_bench)
    row = gemm_bench.bench_shape(32, 64, 32, 1, 1, device=DEVICE.type)
    w4 = gemm_bench.bench_w4(64, 32, 1, 1, device=DEVICE.type, ms=(1,))
    # bf16 outputs; the interpreter's fp32 -> bf16 cast truncates, so only a loose floor here
    assert row["fp8_sqnr_db"] > 30 and row["int8_sqnr_db"] > 30 and w4[0]["w4a16_sqnr_db"] > 30
    assert row["fp8_tflops"] == pytest.approx(2 * 32 * 64 * 32 / 1e-3 / 1e12)
    assert w4[0]["weight_bytes_ratio"] < 0.3
    table = gemm_bench.markdown([row], w4, "test")
    assert "| 32 x 64 x 32 |" in table and "| 1 x 64 x 32 |" in table
