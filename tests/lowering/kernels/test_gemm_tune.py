"""The config sweep end to end on tiny shapes (``--smoke``: Triton's interpreter, wall-clock timing)."""

import json

import pytest
import torch

from qcompile import gemm_tune

from .helpers import DEVICE, needs_kernels

pytestmark = [needs_kernels, pytest.mark.skipif(DEVICE is not None and DEVICE.type == "cuda", reason="the GPU runs the full sweep")]


def test_smoke_sweep_writes_rows_bests_and_summary(tmp_path):
    assert gemm_tune.main(["--smoke", "--out", str(tmp_path), "--families", "fp8_prequant,fp8_tma,int8,w4a16,w4a16_splitk,w4a16_dequant_mm,w4a16_gemv"]) == 0
    result = json.loads((tmp_path / "gemm_tune.json").read_text())
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    assert ok and all(r["sqnr_db"] > gemm_tune.SQNR_FLOOR_DB and r["us"] > 0 for r in ok)
    skipped = [r for r in result["rows"] if r["status"] == "skipped"]
    assert skipped and all("shared memory estimate" in r["reason"] for r in skipped)  # the oversized smoke config
    assert not [r for r in result["rows"] if r["status"] in ("failed", "wrong")]
    shapes = {f"{t} {m}x{k}x{n}" for t, m, k, n in result["shapes"]}
    for fam in ("fp8_prequant", "fp8_tma", "int8"):
        assert set(result["best"][fam]) == {s for s in shapes if not s.startswith("w4")}
    for fam in ("w4a16", "w4a16_splitk", "w4a16_dequant_mm"):  # (split-K tiles the rows above M = 16)
        assert set(result["best"][fam]) == {s for s in shapes if s.startswith("w4")}
    assert set(result["best"]["w4a16_gemv"]) == {f"{t} {m}x{k}x{n}" for t, m, k, n in result["shapes"]  # (few rows only)
                                                 if t.startswith("w4") and m <= gemm_tune.SPLITK_ROWS}
    assert 256 in gemm_tune.W4_MS
    # the production wrapper ran and reported the config its autotuner used
    wrapped = [d for d in result["diagnostics"] if d["kernel"] == "int8"]
    assert wrapped and all(d["wrapper_us"] > 0 and d["wrapper_config"] for d in wrapped)
    assert "| smoke | 32 x 64 x 48 |" in result["markdown"] and "W4A16" in result["markdown"]


def test_precompile_deduplicates_specializations():
    fam = gemm_tune.FAMILIES["fp8_prequant"]
    dt = gemm_tune.w8a8_dtypes(8192, 1152, 4608)
    c = gemm_tune.W8A8_LARGE[0]
    same = gemm_tune._spec_key(fam, 8192, 1152, 4608, c, dt, 132) == gemm_tune._spec_key(fam, 8192, 1152, 1152, c, dt, 132)
    assert same  # only divisibility of the ints matters
    assert gemm_tune._spec_key(fam, 8192, 1152, 4608, c, dt, 132) != gemm_tune._spec_key(fam, 8192, 320, 320, c, dt, 132)  # EVEN_K


def test_smem_estimate_and_names():
    fam = gemm_tune.FAMILIES["fp8"]  # bf16 A tiles
    c = gemm_tune.cfg(128, 256, 128, 4, 8)
    assert gemm_tune.smem_estimate(fam, c) == 4 * (128 * 128 * 2 + 256 * 128)
    assert gemm_tune.smem_estimate(gemm_tune.FAMILIES["fp8_prequant"], c) <= gemm_tune.SMEM_LIMIT
    assert gemm_tune.cfg_name(gemm_tune.cfg(64, 64, 128, 4, 4, FLATTEN=True)) == "64x64x128 s4 w4 g8 +flatten"
    assert gemm_tune.tflops(1000, 1000, 1000, 1.0) == pytest.approx(2.0)
    assert torch.float8_e4m3fn in gemm_tune.w8a8_dtypes(1, 1, 1).values()


def test_tables_from_a_sweep(tmp_path, capsys):
    best = {"fp8_prequant": {
        "a": {"M": 8192, "config": gemm_tune.cfg(128, 256, 128, 4, 8)},
        "b": {"M": 8192, "config": gemm_tune.cfg(128, 256, 128, 4, 8)},
        "c": {"M": 2048, "config": gemm_tune.cfg(128, 128, 128, 4, 4)},
        "d": {"M": 8, "config": gemm_tune.cfg(16, 64, 128, 4, 4)},
    }}
    (tmp_path / "gemm_tune.json").write_text(json.dumps({"best": best}))
    assert gemm_tune.main(["--tables", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fp8_prequant_large = [(128, 256, 128, 4, 8, 8), (128, 128, 128, 4, 4, 8)]" in out
    assert "fp8_prequant_small = [(16, 64, 128, 4, 4, 8)]" in out
