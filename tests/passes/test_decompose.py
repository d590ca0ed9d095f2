import contextlib

import pytest
import torch
import torch.nn as nn

from qcompile.passes.decompose import decompose_fused_attention, fused_attention_leftovers


def run_decomposed(model, *args):
    """Run ``model`` through Dynamo with the decomposition pass; return (output, graph)."""
    graphs = []

    def backend(gm, example_inputs):
        gm = decompose_fused_attention(gm)
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(*args)
    return out, graphs[0]


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("fast_path", [True, False])
def test_encoder_layer_is_rewritten_exactly(norm_first, activation, fast_path):
    """On the eval fast path Dynamo records one fused op; off it (``mha_fastpath_off``), on torch 2.11 / 2.13, one
    ``F.multi_head_attention_forward`` call. Either way the in- and out-projections must become linears, or they would
    silently stay in float."""
    from qcompile.evaluate import mha_fastpath_off

    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=norm_first, activation=activation).eval()
    x = torch.randn(3, 7, 32)
    with contextlib.nullcontext() if fast_path else mha_fastpath_off():
        with torch.no_grad():
            ref = layer(x)
        out, gm = run_decomposed(layer, x)
    assert not fused_attention_leftovers(gm)
    assert torch.allclose(out, ref, atol=1e-5)
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert len(linears) == 4


def test_native_mha_self_attention_is_rewritten():
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()

    class SelfAttn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = SelfAttn()(x)
    out, gm = run_decomposed(SelfAttn(), x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert not fused_attention_leftovers(gm)


def test_multi_head_attention_forward_with_a_mask_is_left_and_reported():
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    mask = torch.zeros(5, 5, dtype=torch.bool).triu(1)

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]

    from qcompile.evaluate import mha_fastpath_off

    x = torch.randn(2, 5, 32)
    with mha_fastpath_off():
        out, gm = run_decomposed(Masked(), x)
    kept = [n.name for n in gm.graph.nodes if n.target is torch.nn.functional.multi_head_attention_forward]
    assert len(kept) == 1 and fused_attention_leftovers(gm) == kept  # (the masked call stays, and is named)
    assert torch.isfinite(out).all()
