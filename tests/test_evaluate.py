import json

import torch

from qcompile import QuantConfig
from qcompile.evaluate import EvalCase, evaluate_case, write_report
from tests.tiny_models import tiny_dit


def test_evaluate_and_report_on_a_tiny_class_conditional_dit(tmp_path):
    model = tiny_dit().model

    def sample(m, noise):  # a 3-step stand-in sampler calling with keywords, like the bundled DiT's
        x = noise
        y = torch.arange(noise.shape[0]) % 4
        for t in (900, 500, 100):
            out = m(x, timestep=torch.full((x.shape[0],), t), class_labels=y, return_dict=False)
            x = x - 0.2 * (out if isinstance(out, torch.Tensor) else out[0])[:, : x.shape[1]]
        return x

    case = EvalCase("tiny_dit", lambda: model, sample, (4, 16, 16), (-3.0, 3.0))
    results = evaluate_case(case, {"bf16": None, "w8a8-int8": QuantConfig.preset("w8a8-int8")}, seeds=2, calib_samples=2, progress=False)
    assert [r.config for r in results] == ["bf16", "w8a8-int8"]
    for r in results:
        assert len(r.per_step_db) == 3 and r.sqnr_worst_db <= r.sqnr_mean_db and 0 < r.ssim <= 1
    assert results[0].sqnr_mean_db > results[1].sqnr_mean_db > 20
    path = write_report(results, tmp_path, "qdiff eval (test)")
    assert "| tiny_dit | w8a8-int8 |" in path.read_text()
    rows = json.loads((tmp_path / "quality.json").read_text())
    assert {"model", "config", "sqnr_mean_db", "sqnr_worst_db", "psnr_db", "ssim"} <= set(rows[0])
    assert (tmp_path / "img" / "quality_tiny_dit.png").is_file()
