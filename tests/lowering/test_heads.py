"""The fp8 attention-heads layout of a q / k / v projection (``lowering/heads.py``): validation, views and the
reference buffer."""

import pytest
import torch

from qcompile.lowering.formats import quantize_fp8
from qcompile.lowering.heads import HeadsLayout, reference_heads


def test_layout_sizes_and_validation():
    lay = HeadsLayout(batch=2, seq=20, n_rm=160, n_vt=80, head_dim=40, head_width=64)
    assert (lay.rows, lay.columns, lay.rm_heads, lay.seq_pad) == (40, 240, 4, 32)
    assert lay.vt_offset == 40 * 4 * 64 and lay.numel == lay.vt_offset + 2 * 80 * 32
    assert lay.kernel_args() == {"N_RM": 160, "SEQ": 20, "SEQ_PAD": 32, "HEAD_D": 40, "HEAD_W": 64}
    for bad, match in [(dict(n_rm=150), "whole heads"), (dict(head_width=96), r"\[head dim, 2 \* head dim\]"),
                       (dict(head_width=32), "head dim"), (dict(n_rm=0, n_vt=0), "some columns"), (dict(seq=0), "positive")]:
        with pytest.raises(ValueError, match=match):
            HeadsLayout(**{**dict(batch=2, seq=20, n_rm=160, n_vt=80, head_dim=40, head_width=64), **bad})
    with pytest.raises(ValueError, match="multiple of 16"):
        HeadsLayout(batch=1, seq=4, n_rm=40, n_vt=0, head_dim=40, head_width=40)


def test_reference_buffer_views_are_the_quantized_heads():
    """q / k / v viewed from the reference buffer are the per-column quantized projection as (B, H, S, D) heads, q / k
    zero-padded to the width, V stored with its keys contiguous; the padding is zero."""
    B, S, H, D, W = 2, 20, 2, 40, 64
    lay = HeadsLayout(batch=B, seq=S, n_rm=2 * H * D, n_vt=H * D, head_dim=D, head_width=W)
    y = torch.randn(B * S, 3 * H * D)
    scales = torch.cat([torch.full((H * D,), s) for s in (0.01, 0.02, 0.005)])
    buf = reference_heads(y, scales, lay)
    assert buf.dtype == torch.float8_e4m3fn and buf.shape == (lay.numel,)
    codes = quantize_fp8(y, scales).float()
    for i, (start, stop) in enumerate([(0, H * D), (H * D, 2 * H * D), (2 * H * D, 3 * H * D)]):
        view = lay.view(buf, start, stop)
        want = codes[:, start:stop].reshape(B, S, H, D).transpose(1, 2)
        if i < 2:
            assert view.shape == (B, H, S, W) and view.stride(-1) == 1
            assert torch.equal(view[..., :D].float(), want) and not view[..., D:].float().any()
        else:
            assert view.shape == (B, H, S, D) and view.stride(2) == 1  # keys contiguous
            assert torch.equal(view.float(), want)
    with pytest.raises(ValueError, match="whole heads of one region"):
        lay.view(buf, 2 * H * D - D, 2 * H * D + D)
    with pytest.raises(ValueError, match="do not match"):
        reference_heads(y[:, :10], scales, lay)
