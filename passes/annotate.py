"""The quantizer: decide, per site, what to quantize and how, and write it into ``node.meta``.

Annotation only *decides*; it changes no graph structure. Observers are inserted by
:mod:`.observe` and the graph is rewritten by :mod:`.convert`. Decisions are keyed by graph edge:
``act`` maps the index of an op's input argument to the spec of the quantizer on that edge.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

import torch.fx as fx

from ..config import ActSpec, FirstLastPolicy, Format, QuantConfig, WeightSpec
from .sites import META_KEY, Site

ANNOTATION_KEY = "qdiff_annotation"


@dataclass(frozen=True)
class Annotation:
    """What the quantizer decided for one site."""

    key: str
    weight: WeightSpec | None  # None: weight kept in full precision
    act: dict[int, ActSpec] = field(default_factory=dict)  # input edge index -> quantizer
    reason: str | None = None  # why the site stays in full precision
    splits: dict[int, tuple[int, ...]] = field(default_factory=dict)  # input edge -> channel split points (one quantizer per slice)

    @property
    def quantized(self) -> bool:
        return self.weight is not None


def decide(site: Site, config: QuantConfig) -> Annotation:
    """The config's decision for one site, before the first/last-layer policy."""
    if site.unsupported:
        return Annotation(site.key, None, reason=f"unsupported: {site.unsupported}")
    if site.kind not in config.ops:
        return Annotation(site.key, None, reason=f"op kind '{site.kind.value}' not in config.ops")
    for pattern in config.skip_names:
        if fnmatch.fnmatchcase(site.key, pattern):
            return Annotation(site.key, None, reason=f"name matches skip pattern '{pattern}'")
    return Annotation(site.key, config.weight, {} if config.act is None else {0: config.act})


def apply_first_last(annotations: list[Annotation], policy: FirstLastPolicy) -> list[Annotation]:
    """Apply the first/last-layer policy to annotations in execution order."""
    candidates = [i for i, a in enumerate(annotations) if a.quantized]
    if policy is FirstLastPolicy.QUANTIZE or not candidates:
        return annotations
    out = list(annotations)
    for i in {candidates[0], candidates[-1]}:
        a = out[i]
        if policy is FirstLastPolicy.SKIP:
            out[i] = Annotation(a.key, None, reason="first/last layer kept in full precision (config.first_last)")
        elif a.weight.bits < 8:
            out[i] = replace(a, weight=WeightSpec(Format.INT8, clip_search=a.weight.clip_search))
    return out


def annotate(gm: fx.GraphModule, decisions: dict[str, Annotation]) -> fx.GraphModule:
    """Write each site's decision into ``node.meta[ANNOTATION_KEY]`` (sites with none stay float)."""
    for node in gm.graph.nodes:
        site = node.meta.get(META_KEY)
        if site is not None:
            node.meta[ANNOTATION_KEY] = decisions.get(site.key, Annotation(site.key, None, reason="not in plan"))
    return gm
