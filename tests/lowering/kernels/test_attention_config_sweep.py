"""examples/attention_config_sweep.py: each config runs the lowering's attention inputs, is checked against the
reference and timed; the production autotuner is restored afterwards (Triton's interpreter on CPU: every config runs
the interpreter's tile, so only the mechanics are tested here; the timings are the GPU's)."""

import importlib
import sys
from pathlib import Path

from .helpers import DEVICE, needs_kernels

pytestmark = needs_kernels
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))


def test_sweep_checks_each_config_and_restores_the_autotuner(monkeypatch):
    import attention_config_sweep as sweep

    import qcompile.latency as latency

    timed = []

    def timer(fn):  # runs the call like the real timer; the n-th timed call "takes" 10 + n us
        assert fn() is not None
        timed.append(1)
        return 10.0 + len(timed)

    monkeypatch.setattr(latency, "cuda_graph_timer", timer)
    fa = importlib.import_module("qcompile.lowering.kernels.fp8_attention")
    production = fa._kernel
    row = sweep.sweep_shape("tiny", 1, 2, 24, 24, 72, [(16, 32, 1, 4), (32, 32, 1, 4)], DEVICE)
    assert fa._kernel is production
    assert list(row["configs"]) == ["autotuned", "16x32x1x4", "32x32x1x4"] and len(timed) == 3
    # the lowering's fp8 output against the reference's codes: equal in the interpreter, fp8-accumulation close on sm_90
    assert all(c["sqnr_vs_reference_db"] > (60 if DEVICE.type == "cpu" else 30) for c in row["configs"].values())
    assert row["best"] == "16x32x1x4"  # the fastest of the explicit configs (the autotuned time is not a candidate)
    assert "| tiny | 1, 2, 24, 24, 72 | 11.0 (" in sweep.table([row])


def test_sweep_times_each_config_under_each_softmax_mode_and_restores_the_environment(monkeypatch):
    import attention_config_sweep as sweep

    import qcompile.latency as latency

    fa = importlib.import_module("qcompile.lowering.kernels.fp8_attention")
    seen = []

    def timer(fn):  # records the mode each timed call ran under
        assert fn() is not None
        seen.append(fa.softmax_mode(72))
        return 10.0 + len(seen)

    monkeypatch.setattr(latency, "cuda_graph_timer", timer)
    monkeypatch.setenv(fa.SOFTMAX_ENV, "half")
    row = sweep.sweep_shape("tiny", 1, 2, 24, 24, 72, [(16, 32, 1, 4)], DEVICE, ["ex2", "bits"])
    assert list(row["configs"]) == ["autotuned ex2", "16x32x1x4 ex2", "autotuned bits", "16x32x1x4 bits"]
    assert seen == [0, 0, 2, 2] and row["best"] == "16x32x1x4 ex2"
    assert fa.softmax_mode(72) == fa.SOFTMAX_MODES.index("half")  # the caller's environment is back
    assert all(c["sqnr_vs_reference_db"] > 30 for c in row["configs"].values())  # (the reference computes ex2's P)
