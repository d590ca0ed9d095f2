"""Rewrite PyTorch's fused transformer fast paths into the ops they compute.

In eval mode ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` may run as one fused op
(``torch._transformer_encoder_layer_fwd`` / ``torch._native_multi_head_attention``), and Dynamo
records that op; off the fast path (``qcompile.evaluate.mha_fastpath_off``, training-style calls) Dynamo may record
``F.multi_head_attention_forward`` as one call instead of tracing into it. Their linears are then invisible. This pass replaces each such node with the
equivalent ``linear`` / ``scaled_dot_product_attention`` / ``layer_norm`` nodes, so that the
quantizer finds the in-projection, out-projection and feed-forward linears by what they compute.
Nodes it cannot rewrite (masks, cross-attention, attention weights requested) are left as they
are and reported by :func:`fused_attention_leftovers`.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .attention_sites import HEAD_DIM_META_KEY
from .sites import bind

_ENCODER_LAYER = torch._transformer_encoder_layer_fwd
_NATIVE_MHA = torch._native_multi_head_attention

_ENCODER_ARGS = (
    "src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
    "use_gelu", "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2", "norm_bias_2",
    "ffn_weight_1", "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask", "mask_type",
)
_MHA_ARGS = (
    "query", "key", "value", "embed_dim", "num_head", "qkv_weight", "qkv_bias", "proj_weight",
    "proj_bias", "mask", "need_weights", "average_attn_weights", "mask_type",
)
_MHA_DEFAULTS = {"mask": None, "need_weights": True, "average_attn_weights": True, "mask_type": None}
_MHA_FORWARD = F.multi_head_attention_forward
_MHA_FORWARD_ARGS = tuple(inspect.signature(_MHA_FORWARD).parameters)
_MHA_FORWARD_DEFAULTS = {k: p.default for k, p in inspect.signature(_MHA_FORWARD).parameters.items() if p.default is not p.empty}
# arguments of F.multi_head_attention_forward the rewrite takes only at these values (self-attention, packed
# in-projection, no masks, extra keys or dropout)
_MHA_FORWARD_PLAIN = {"bias_k": None, "bias_v": None, "add_zero_attn": False, "key_padding_mask": None, "attn_mask": None,
                      "use_separate_proj_weight": False, "static_k": None, "static_v": None, "is_causal": False}


def _self_attention(g: fx.Graph, x, a: dict, num_heads: int, embed_dim: int, source: fx.Node | None = None):
    """Packed in-projection, SDPA and out-projection on ``x`` (B, L, E); returns (B, L, E). The SDPA node gets the
    head dim and ``source``'s module stack in its meta (for :mod:`.attention_sites`: it has no example value)."""
    head_dim = embed_dim // num_heads
    qkv = g.call_function(F.linear, (x, a["qkv_weight"], a["qkv_bias"]))
    qkv = g.call_method("unflatten", (qkv, -1, (3, num_heads, head_dim)))
    qkv = g.call_method("permute", (qkv, 2, 0, 3, 1, 4))  # (3, B, H, L, D)
    q, k, v = (g.call_function(operator.getitem, (qkv, i)) for i in range(3))
    attn = g.call_function(F.scaled_dot_product_attention, (q, k, v))
    attn.meta[HEAD_DIM_META_KEY] = head_dim
    if source is not None and "nn_module_stack" in source.meta:
        attn.meta["nn_module_stack"] = dict(source.meta["nn_module_stack"])
    attn = g.call_method("flatten", (g.call_method("transpose", (attn, 1, 2)), 2))
    return g.call_function(F.linear, (attn, a["proj_weight"], a["proj_bias"]))


def _rewrite_encoder_layer(g: fx.Graph, node: fx.Node) -> bool:
    a = bind(node, _ENCODER_ARGS, {"mask": None, "mask_type": None})
    if a["mask"] is not None:
        return False
    E, H, eps = a["embed_dim"], a["num_heads"], a["eps"]
    act = F.gelu if a["use_gelu"] else F.relu

    def norm(x, i):
        return g.call_function(F.layer_norm, (x, (E,), a[f"norm_weight_{i}"], a[f"norm_bias_{i}"], eps))

    def ffn(x):
        h = g.call_function(act, (g.call_function(F.linear, (x, a["ffn_weight_1"], a["ffn_bias_1"])),))
        return g.call_function(F.linear, (h, a["ffn_weight_2"], a["ffn_bias_2"]))

    with g.inserting_before(node):
        src = a["src"]
        if a["norm_first"]:
            x = g.call_function(operator.add, (src, _self_attention(g, norm(src, 1), a, H, E, node)))
            out = g.call_function(operator.add, (x, ffn(norm(x, 2))))
        else:
            x = norm(g.call_function(operator.add, (src, _self_attention(g, src, a, H, E, node))), 1)
            out = norm(g.call_function(operator.add, (x, ffn(x))), 2)
    node.replace_all_uses_with(out)
    g.erase_node(node)
    return True


def _rewrite_native_mha(g: fx.Graph, node: fx.Node) -> bool:
    a = bind(node, _MHA_ARGS, _MHA_DEFAULTS)
    if not (a["query"] is a["key"] is a["value"] and a["mask"] is None and _only_output_used(node)):
        return False
    with g.inserting_before(node):
        out = _self_attention(g, a["query"], a, a["num_head"], a["embed_dim"], node)
    for user in list(node.users):
        user.replace_all_uses_with(out)
        g.erase_node(user)
    g.erase_node(node)
    return True


def _only_output_used(node: fx.Node) -> bool:
    return all(u.target is operator.getitem and u.args[1] == 0 for u in node.users)


def _rewrite_mha_forward(g: fx.Graph, node: fx.Node) -> bool:
    """``F.multi_head_attention_forward`` on sequence-first ``(L, B, E)`` inputs: self-attention with a packed
    in-projection and nothing else (:data:`_MHA_FORWARD_PLAIN`, no dropout in training) becomes linear / SDPA / linear."""
    a = bind(node, _MHA_FORWARD_ARGS, _MHA_FORWARD_DEFAULTS)
    plain = all(a[k] is v for k, v in _MHA_FORWARD_PLAIN.items())
    no_dropout = not a["training"] or a["dropout_p"] == 0
    if not (a["query"] is a["key"] is a["value"] and plain and no_dropout and _only_output_used(node)):
        return False
    parts = {"qkv_weight": a["in_proj_weight"], "qkv_bias": a["in_proj_bias"], "proj_weight": a["out_proj_weight"],
             "proj_bias": a["out_proj_bias"]}
    with g.inserting_before(node):
        x = g.call_method("transpose", (a["query"], 0, 1))  # (B, L, E)
        out = g.call_method("transpose", (_self_attention(g, x, parts, a["num_heads"], a["embed_dim_to_check"], node), 0, 1))
    for user in list(node.users):
        user.replace_all_uses_with(out)
        g.erase_node(user)
    g.erase_node(node)
    return True


def decompose_fused_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace fused transformer-layer / MHA fast-path nodes by their constituent ops."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _ENCODER_LAYER:
            changed |= _rewrite_encoder_layer(gm.graph, node)
        elif node.target is _NATIVE_MHA:
            changed |= _rewrite_native_mha(gm.graph, node)
        elif node.target is _MHA_FORWARD:
            changed |= _rewrite_mha_forward(gm.graph, node)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def fused_attention_leftovers(gm: fx.GraphModule) -> list[str]:
    """Names of fused attention nodes the rewrite had to leave (their linears stay in float)."""
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in (_ENCODER_LAYER, _NATIVE_MHA, _MHA_FORWARD)]
