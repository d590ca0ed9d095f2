"""Attention sites: found in diffusers' and PyTorch's attention, keyed by module, unsupported calls named."""

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qcompile.graph import prepare
from qcompile.passes.attention_sites import ATTENTION_META_KEY, find_attention_sites, insert_attention_observers
from tests.tiny_models import tiny_dit, tiny_dit_attn, tiny_unet2d_condition


def prepared_sites(model, args, kwargs=None):
    """Capture ``model`` with Dynamo, run ``prepare`` and return (graph, attention sites of every graph)."""
    found = []

    def backend(gm, example_inputs):
        gm, _ = prepare(gm, example_inputs)
        found.append((gm, list(example_inputs), [n.meta[ATTENTION_META_KEY] for n in gm.graph.nodes if ATTENTION_META_KEY in n.meta]))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(*args, **(kwargs or {}))
    return found[0][0], [s for _, _, sites in found for s in sites], found[0][1]


def test_dit_sites_keyed_by_module_and_head_dim_checked():
    case = tiny_dit_attn()
    _, sites, _ = prepared_sites(case.model, case.args, case.kwargs)
    assert [s.key for s in sites] == ["transformer_blocks.0.attn1.sdpa", "transformer_blocks.1.attn1.sdpa"]
    assert all(s.unsupported is None and s.head_dim == 32 and s.scale is None for s in sites)
    case16 = tiny_dit()  # heads of 16: below the kernel's 32
    torch._dynamo.reset()
    _, sites16, _ = prepared_sites(case16.model, case16.args, case16.kwargs)
    assert [s.key for s in sites16] == [s.key for s in sites]
    assert all("head dim 16 outside the fp8 kernel's 32-160" in s.unsupported for s in sites16)


def test_unet_self_and_cross_attention_sites():
    case = tiny_unet2d_condition()
    _, sites, _ = prepared_sites(case.model, case.args, case.kwargs)
    keys = {s.key: s for s in sites}
    mid = "mid_block.attentions.0.transformer_blocks.0"
    assert f"{mid}.attn1.sdpa" in keys and f"{mid}.attn2.sdpa" in keys
    assert keys[f"{mid}.attn1.sdpa"].unsupported is None and keys[f"{mid}.attn2.sdpa"].unsupported is None  # 32-wide heads
    down = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.sdpa"
    assert "head dim 16" in keys[down].unsupported  # (legacy config: 2 heads of 16 at 32 channels)
    assert len(keys) == len(sites)  # unique per graph


class Calls(nn.Module):
    """SDPA calls the kernel cannot take, and two calls in one module."""

    def forward(self, q, k, v, kg, mask):
        outs = [
            F.scaled_dot_product_attention(q, k, v),
            F.scaled_dot_product_attention(q, k, v, scale=0.25),
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            F.scaled_dot_product_attention(q, k, v, is_causal=True),
            F.scaled_dot_product_attention(q, k, v, dropout_p=0.1),
            F.scaled_dot_product_attention(q, kg, kg, enable_gqa=True),
            F.scaled_dot_product_attention(q[..., :24], k[..., :24], v[..., :24]),
        ]
        return sum(o.sum() for o in outs)


def test_unsupported_calls_have_reasons_and_repeated_calls_get_suffixes():
    q, k, v = (torch.randn(1, 4, 8, 32) for _ in range(3))
    kg = torch.randn(1, 2, 8, 32)
    _, sites, _ = prepared_sites(Calls(), (q, k, v, kg, torch.zeros(8, 8, dtype=torch.bool)))
    assert [s.key for s in sites] == ["sdpa"] + [f"sdpa#{i}" for i in range(1, 7)]
    reasons = [s.unsupported for s in sites]
    assert reasons[:2] == [None, None] and sites[1].scale == 0.25
    assert reasons[2] == "attention mask" and reasons[3] == "causal attention" and reasons[4] == "dropout_p=0.1"
    assert reasons[5] == "grouped-query attention (enable_gqa)"
    assert "head dim 24" in reasons[6]


@pytest.mark.parametrize("fast_path", [True, False])
def test_decomposed_transformer_layer_gets_a_keyed_site(fast_path):
    """The SDPA that decompose writes for nn.TransformerEncoderLayer has no example value: head dim and module from meta."""
    from qcompile.evaluate import mha_fastpath_off

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.TransformerEncoderLayer(64, 2, 128, batch_first=True) for _ in range(2)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    model = Enc().eval()
    with contextlib.nullcontext() if fast_path else mha_fastpath_off():
        _, sites, _ = prepared_sites(model, (torch.randn(2, 5, 64),))
    assert len(sites) == 2 and all(s.unsupported is None and s.head_dim == 32 for s in sites)
    assert [s.key.split(".")[:2] for s in sites] == [["layers", "0"], ["layers", "1"]]
    assert len({s.key for s in sites}) == 2


def test_observers_sit_on_the_q_k_v_edges_of_supported_sites_only():
    q, k, v = (torch.randn(1, 4, 8, 32) for _ in range(3))
    gm, _, inputs = prepared_sites(Calls(), (q, k, v, torch.randn(1, 2, 8, 32), torch.zeros(8, 8, dtype=torch.bool)))
    seen = []

    class Spy(nn.Module):
        def __init__(self, site, which):
            super().__init__()
            self.tag = (site.key, which)

        def forward(self, x):
            seen.append(self.tag)
            return x

    find_attention_sites(gm)
    insert_attention_observers(gm, Spy)
    gm(*inputs)
    assert seen == [("sdpa", w) for w in "qkv"] + [("sdpa#1", w) for w in "qkv"]
