"""fp8 attention: calibration of q / k / v scales, the plan's attention record, and what a compile applies.

With ``QuantConfig.attention`` set, calibration observes the q, k and v inputs of every supported attention site
(:mod:`.passes.attention_sites`) per timestep bin, in the session's statistics (``"<site>/q"`` ...: bins merge with
the others'), and at the end chooses one e4m3 scale per input, site and timestep group with the config's range method
(:func:`.observers.choose_qparams`). The plan keeps them in its ``attention`` record (JSON; validated on load). At
compile time :func:`attention_ops` gives one group's scales and :func:`attention_float` the sites kept in full
precision (unsupported calls, sites the plan holds no scales for), for the backend's one warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .errors import PlanMismatchError
from .observers import choose_qparams
from .passes.attention_sites import ATTENTION_META_KEY, INPUTS, AttentionSite, insert_attention_observers
from .passes.convert_attention import QuantizedAttention

RECORD_VERSION = 1


def attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """The attention sites ``prepare`` recorded in ``gm`` (graph order)."""
    return [n.meta[ATTENTION_META_KEY] for n in gm.graph.nodes if ATTENTION_META_KEY in n.meta]


def stats_key(site: str, which: str) -> str:
    """The calibration statistics key of one input (``q`` / ``k`` / ``v``) of an attention site."""
    return f"{site}/{which}"


class AttentionObserver(torch.nn.Module):
    """Passes q, k or v through and records it in the calibration session's statistics (current timestep bin)."""

    def __init__(self, session: Any, site: AttentionSite, which: str):
        super().__init__()
        self.session = session
        self.key = stats_key(site.key, which)
        self.node = site.node

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.session.closed:
            self.session.record(self.key, x, self.node, "attention input")
        return x


@dataclass
class AttentionCalibration:
    """The attention part of a calibration session: sites seen (first graph that has each)."""

    sites: dict[str, AttentionSite] = field(default_factory=dict)

    def observe(self, session: Any, gm: fx.GraphModule) -> fx.GraphModule:
        """Record ``gm``'s attention sites and put observers on the q / k / v edges of the supported ones."""
        for site in attention_sites(gm):
            self.sites.setdefault(site.key, site)
        return insert_attention_observers(gm, lambda site, which: AttentionObserver(session, site, which))

    def finish(self, session: Any, members: list[list[int]]) -> "AttentionRecord":
        """Scales per supported site and timestep group (``members``: each group's bins); sites missing in a group stay float."""
        spec = session.config.attention
        scales, unsupported = {}, {}
        for key, site in self.sites.items():
            if site.unsupported:
                unsupported[key] = f"unsupported: {site.unsupported}"
                continue
            per_group, missing = [], []
            for g, m in enumerate(members):
                stats = [session._group_stats(stats_key(key, w), m) for w in INPUTS]
                if any(s is None for s in stats):
                    missing.append(g)
                    continue
                per_group.append(tuple(float(choose_qparams(s, spec).scale) for s in stats))
            if missing:
                unsupported[key] = f"not executed in timestep group(s) {missing} during calibration"
            else:
                scales[key] = per_group
        return AttentionRecord(scales, unsupported)


@dataclass
class AttentionRecord:
    """The plan's attention section: e4m3 (q, k, v) scales per site and timestep group, and the sites kept in float."""

    scales: dict[str, list[tuple[float, float, float]]]
    unsupported: dict[str, str] = field(default_factory=dict)  # site key -> why it stays in full precision

    def keys(self) -> list[str]:
        return sorted({*self.scales, *self.unsupported})

    def to_dict(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, "scales": {k: [list(s) for s in v] for k, v in self.scales.items()},
                "unsupported": dict(self.unsupported)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], groups: int) -> "AttentionRecord":
        """Inverse of :meth:`to_dict`, validated: version, one finite positive (q, k, v) triple per group, disjoint keys."""
        if not isinstance(d, dict) or d.get("version") != RECORD_VERSION:
            raise ValueError(f"attention record version {d.get('version') if isinstance(d, dict) else d!r} (this qdiff reads {RECORD_VERSION})")
        scales, unsupported = d.get("scales"), d.get("unsupported")
        if not isinstance(scales, dict) or not isinstance(unsupported, dict):
            raise ValueError("attention record needs 'scales' and 'unsupported' mappings")
        out = {}
        for key, per_group in scales.items():
            if not isinstance(per_group, list) or len(per_group) != groups:
                raise ValueError(f"attention site '{key}' has {len(per_group) if isinstance(per_group, list) else per_group!r} scale triples for {groups} timestep groups")
            triples = []
            for g, t in enumerate(per_group):
                ok = isinstance(t, list) and len(t) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in t)
                if not ok:
                    raise ValueError(f"attention site '{key}' group {g}: scales {t!r} are not three finite positive numbers")
                triples.append(tuple(float(x) for x in t))
            out[key] = triples
        both = set(out) & set(unsupported)
        if both:
            raise ValueError(f"attention site(s) {sorted(both)} both have scales and are kept in full precision")
        if not all(isinstance(r, str) for r in unsupported.values()):
            raise ValueError("attention record: every full-precision site needs a reason")
        return cls(out, dict(unsupported))


def attention_ops(plan: Any, group: int) -> dict[str, QuantizedAttention]:
    """One timestep group's attention scales (empty without an attention record)."""
    rec = plan.attention
    return {} if rec is None else {k: QuantizedAttention(*v[group]) for k, v in rec.scales.items()}


def attention_float(plan: Any, sites: list[AttentionSite]) -> dict[str, str]:
    """Attention sites of a graph kept in full precision (key -> why), for the backend's warning; raises
    :class:`PlanMismatchError` for a supported site the plan does not know. Plans without attention: nothing."""
    rec = plan.attention
    if rec is None:
        return {}
    out = {}
    for i, site in enumerate(sites):
        if site.unsupported:
            out[site.key] = f"unsupported: {site.unsupported}"
        elif site.key in rec.unsupported:
            out[site.key] = rec.unsupported[site.key]
        elif site.key not in rec.scales:
            raise PlanMismatchError(
                f"plan does not fit this graph: attention call #{i} '{site.key}' (graph node '{site.node}') has no scales "
                f"in the plan, which was calibrated for {plan.model_class} (fingerprint {plan.fingerprint}); recalibrate for this model"
            )
    return out
