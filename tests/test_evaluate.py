import json
import math

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
    assert results[0].fd_real is None and results[0].class_consistency is None  # no classifier for this case
    path = write_report(results, tmp_path, "qdiff eval (test)")
    assert "| tiny_dit | w8a8-int8 |" in path.read_text()
    rows = json.loads((tmp_path / "quality.json").read_text())
    assert {"model", "config", "sqnr_mean_db", "sqnr_worst_db", "psnr_db", "ssim"} <= set(rows[0])
    assert (tmp_path / "img" / "quality_tiny_dit.png").is_file()

    # one report assembled from several runs' quality.json (the CLI's --report-from), rows kept in order
    merged = tmp_path / "merged"
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{**rows[1], "model": "tiny_dit_2"}, {**rows[0], "ssim": 0.5}]))  # bf16 re-measured
    from qcompile.cli import main

    assert main(["eval", "--report-from", str(tmp_path / "quality.json"), str(other), "--out", str(merged), "--report-run", "a test run"]) == 0
    text = (merged / "quality.md").read_text()
    assert "a test run" in text and text.index("| tiny_dit | bf16 |") < text.index("| tiny_dit_2 | w8a8-int8 |")
    assert text.count("| tiny_dit | bf16 |") == 1 and "| 0.5000 |" in text
    assert main(["eval", "--report-from", str(tmp_path / "absent.json"), "--out", str(merged)]) == 2


def test_evaluate_mnist_vit_reports_fd_and_class_consistency(shared_models, tmp_path):
    from qcompile.zoo import flow_sample, load_mnist_vit

    labels = lambda n: torch.arange(n) % 10  # noqa: E731
    case = EvalCase(
        "mnist_vit", load_mnist_vit, lambda m, noise: flow_sample(m, noise, labels(noise.shape[0]), num_steps=3), (1, 28, 28),
        classifier="mnist", labels=labels,
    )
    # bf16 only: the FD fields do not depend on how a variant is made, and it needs no compile
    results = evaluate_case(case, {"bf16": None}, seeds=4, calib_samples=2, progress=False)
    for r in results:
        assert r.fd_classifier == "mnist" and r.fd_samples == 4
        for v in (r.fd_real, r.fd_fp32, r.class_consistency, r.fp32_fd_real, r.real_fd_real, r.fp32_class_consistency):
            assert v is not None and math.isfinite(v)
        assert r.fd_real >= 0 and r.fd_fp32 >= 0 and 0 <= r.class_consistency <= 1
    assert results[0].fd_fp32 < results[0].fp32_fd_real  # bf16 samples sit much closer to FP32 than FP32 to real data
    path = write_report(results, tmp_path, "qdiff eval (test)")
    text = path.read_text()
    assert "FD vs real" in text and "| mnist_vit | mnist | 4 |" in text
    row = json.loads((tmp_path / "quality.json").read_text())[0]
    assert {"fd_real", "fd_fp32", "class_consistency"} <= set(row)


def test_evaluation_traces_transformer_layers_without_the_fused_fast_path():
    """torch 2.11 graph-breaks around the MHA fast path when the batch changes (layers then run in float)."""
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()

    class Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, t):
            return self.layer(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(x.shape)

    seen = []

    def sample(m, noise):
        seen.append(torch.backends.mha.get_fastpath_enabled())
        x = noise
        for t in (900, 100):
            x = x - 0.1 * m(x, torch.tensor(t))
        return x

    before = torch.backends.mha.get_fastpath_enabled()
    results = evaluate_case(EvalCase("tiny_tel", Denoiser, sample, (16, 12, 12), (-3.0, 3.0)), {"w8a8-int8": QuantConfig.preset("w8a8-int8")}, seeds=3, calib_samples=2, progress=False)
    assert seen and not any(seen)
    assert torch.backends.mha.get_fastpath_enabled() == before
    assert 15 < results[0].sqnr_mean_db < 60  # quantized (not an unquantized float layer's ~inf)


def test_rate_distortion_variants():
    from qcompile.config import CANDIDATE_BITS, Rounding
    from qcompile.evaluate import experiments

    ex = experiments()
    nobf16 = ex["mixed-4.5a8-nobf16"]
    assert "bf16" not in nobf16.allocation.candidates and {"int5", "int4g32"} <= set(nobf16.allocation.candidates)
    assert nobf16.weight_bit_budget == 4.5 and nobf16.timestep_groups == 1
    per, shared = ex["mixed-4.5a8-nobf16-k10"], ex["mixed-4.5a8-nobf16-k10-shared"]
    assert per.timestep_groups == shared.timestep_groups == 10 and per.allocation.per_group and not shared.allocation.per_group
    assert per.allocation.candidates == shared.allocation.candidates == nobf16.allocation.candidates
    assert ex["w4a8-k10"].timestep_groups == ex["w6a8-k10"].timestep_groups == 10 and ex["w6a8-k10"].weight.fmt.value == "int6"
    assert ex["mixed-4.5a8-nobf16-gptq"].weight.rounding is Rounding.GPTQ and ex["w4a8-gptq"].weight.group_size == 64
    assert CANDIDATE_BITS["int5"] == 5 and CANDIDATE_BITS["int4g32"] == 4.5
    for cfg in ex.values():  # every variant survives the plan's config round-trip
        assert cfg is None or type(cfg).from_dict(cfg.to_dict()) == cfg
