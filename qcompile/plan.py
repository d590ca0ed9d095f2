"""QuantPlan: everything needed to rebuild a quantized model without recalibrating.

A plan file is one safetensors file: the quantized weights, their scales, per-call activation
range logs and a probe input are tensors; the rest (config, per-node decisions, activation
quantizers per timestep group, versions, model class, graph fingerprint) is JSON in the
safetensors metadata under ``qdiff_plan``. Nothing is ever unpickled. Loading validates the
format version, every tensor's presence, dtype and shape, and reports the first problem by name.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import OpKind, QuantConfig, WeightSpec, candidate_holds
from .errors import PlanFileError, PlanMismatchError
from .lowering.weights import QuantizedWeight, storage_shape
from .lowering.formats import FP8_DTYPE
from .observers import ActQParams
from .act_floor import ActFloorRecord
from .attention import AttentionRecord
from .passes.allocate import AllocationRecord
from .timesteps import TimestepGroups

# 4: int8 embedding tables; 3: attention record; 2: outlier-split activation quantizers, activation floor record (older
# plans load without them)
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
METADATA_KEY = "qdiff_plan"
_STORAGE_DTYPES = {"int8": torch.int8, "int4": torch.uint8, "int6": torch.int8, "int5": torch.int8, "fp8_e4m3": FP8_DTYPE}


@dataclass
class NodePlan:
    """The decision for one quantizable op, and its quantized data."""

    key: str
    kind: OpKind
    weight_name: str
    weight_shape: tuple[int, ...]
    conv_args: dict[str, Any]
    weight: QuantizedWeight | None  # None: kept in full precision
    acts: list[ActQParams | None]  # per timestep group; None: input not quantized
    reason: str | None = None  # why it is kept in full precision
    input_shape: tuple[int, ...] | None = None
    stats: list[dict[str, float]] = field(default_factory=list)  # per group: amin, amax, count
    call_log: torch.Tensor | None = None  # (calls, 4): call index, timestep, min, max
    bias_correction: torch.Tensor | None = None  # (groups, out_features) float32
    smooth: torch.Tensor | None = None  # (in_channels,) float32 smoothing factors (weight holds W * s)
    split: tuple[int, ...] | None = None  # input-channel split points: per-slice act quantizers (acts[g].slices) and weight scales
    split_note: str | None = None  # the channel-provenance decision, for reports (None: no concat behind the input)
    group_weights: list[QuantizedWeight | None] | None = None  # per timestep group where they differ (per-group bit allocation)

    @property
    def quantized(self) -> bool:
        """Quantized in at least one timestep group (``weight`` is then the first group's quantized weight)."""
        return self.weight is not None

    def weight_for(self, group: int) -> QuantizedWeight | None:
        """The weight group ``group`` runs with (None: full precision in that group)."""
        return self.weight if self.group_weights is None else self.group_weights[group]

    def stored_weights(self) -> dict[str, QuantizedWeight]:
        """Distinct weights by storage label (groups sharing a format share one tensor)."""
        ws = [self.weight] if self.group_weights is None else self.group_weights
        return {weight_label(w): w for w in ws if w is not None}

    @property
    def signature(self) -> str:
        return f"{self.key}:{self.kind.value}:{'x'.join(map(str, self.weight_shape))}"

    def weight_spec(self, group: int | None = None) -> WeightSpec | None:
        """The stored weight's spec (of ``group``'s weight where given)."""
        w = self.weight if group is None else self.weight_for(group)
        if w is None:
            return None
        return WeightSpec(w.fmt, w.group_size, clip_search=False)  # as stored

    def _json(self) -> dict[str, Any]:
        w = self.weight
        return {
            "key": self.key,
            "kind": self.kind.value,
            "weight_name": self.weight_name,
            "weight_shape": list(self.weight_shape),
            "conv_args": self.conv_args,
            "weight": None if w is None else _weight_json(w),
            "acts": [None if a is None else a.to_dict() for a in self.acts],
            "reason": self.reason,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "stats": self.stats,
            "has_call_log": self.call_log is not None,
            "has_bias_correction": self.bias_correction is not None,
            "has_smooth": self.smooth is not None,
            **({} if self.split is None else {"split": list(self.split)}),
            **({} if self.split_note is None else {"split_note": self.split_note}),
            **({} if self.group_weights is None else {
                "group_weights": [None if w is None else weight_label(w) for w in self.group_weights],
                "weights": {label: _weight_json(w) for label, w in self.stored_weights().items()},
            }),
        }


def weight_label(w: QuantizedWeight) -> str:
    """Storage label of a weight format: ``int6``, ``int4g64``, ``fp8_e4m3`` (tensors ``weight@<label>``)."""
    return w.fmt + ("" if w.group_size is None else f"g{w.group_size}")


def _weight_json(w: QuantizedWeight) -> dict[str, Any]:
    return {"fmt": w.fmt, "group_size": w.group_size, **({} if w.splits is None else {"splits": list(w.splits)})}


def _json_conv_args(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}


class QuantPlan:
    """A calibrated quantization plan. Build with :func:`qcompile.calibrate`; persist with save/load."""

    def __init__(
        self,
        config: QuantConfig,
        nodes: dict[str, NodePlan],
        groups: TimestepGroups,
        subgraphs: list[list[str]],
        model_class: str,
        calls: list[dict[str, Any]] | None = None,
        probe: tuple[Any, dict[str, torch.Tensor]] | None = None,
        meta: dict[str, Any] | None = None,
    ):
        self.config = config
        self.nodes = nodes
        self.groups = groups
        self.subgraphs = subgraphs
        self.model_class = model_class
        self.calls = calls or []
        self.probe = probe  # (JSON structure of (args, kwargs), tensors by name)
        self.meta = meta or {
            "qdiff_version": __version__,
            "torch_version": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        self.allocation: AllocationRecord | None = None  # rate-distortion bit allocation (weight_bit_budget)
        self.act_floor: ActFloorRecord | None = None  # timestep groups kept at unquantized activations (group_act_floor_db)
        self.attention: AttentionRecord | None = None  # fp8 attention scales per site and group (config.attention)
        self.tables: dict[str, QuantizedWeight] = {}  # int8 embedding tables by weight name (config.embedding_tables)
        self.compiled: list[Any] = []  # runtime only: QuantizedGraph records made by the backend
        self.warned: set[str] = set()  # runtime only: node keys already reported as float

    # -- identity ------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Hash of the model class and every quantizable op's key, kind and weight shape (and attention site keys, in plans
        with an attention record, and table names and shapes, in plans with int8 tables)."""
        attention = [] if self.attention is None else [f"{k}:attention" for k in self.attention.keys()]
        tables = [f"{k}:table:{'x'.join(map(str, w.shape))}" for k, w in self.tables.items()]
        text = "\n".join([self.model_class, *(n.signature for n in self.nodes.values()), *attention, *tables])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def digest(self) -> str:
        """Hash of the whole plan (decisions and tensors): changes whenever compiled code must."""
        h = hashlib.sha256(json.dumps(self._json(), sort_keys=True).encode())
        for name, t in sorted(self._tensors().items()):
            h.update(name.encode())
            # the buffer itself (contiguous, on CPU): no bytes copy of every weight; reshape(-1) for 0-dim tensors (a
            # pipeline's timestep in the probe), which cannot be viewed as bytes
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()[:16]

    def quantized_nodes(self) -> list[NodePlan]:
        return [n for n in self.nodes.values() if n.quantized]

    def float_nodes(self) -> list[NodePlan]:
        return [n for n in self.nodes.values() if not n.quantized]

    def check_sites(self, signatures: list[str]) -> None:
        """Raise :class:`PlanMismatchError` unless every op signature of a graph is in the plan."""
        known = {n.signature for n in self.nodes.values()}
        by_key = {n.key: n for n in self.nodes.values()}
        for i, sig in enumerate(signatures):
            if sig in known:
                continue
            key = sig.split(":")[0]
            if key in by_key:
                raise PlanMismatchError(
                    f"plan does not fit this graph: op #{i} '{key}' is {sig.split(':', 1)[1]} here but "
                    f"{by_key[key].signature.split(':', 1)[1]} in the plan (calibrated for {self.model_class}, "
                    f"fingerprint {self.fingerprint}); recalibrate for this model"
                )
            raise PlanMismatchError(
                f"plan does not fit this graph: op #{i} '{key}' ({sig.split(':', 1)[1]}) is not in the plan, "
                f"which was calibrated for {self.model_class} (fingerprint {self.fingerprint}); "
                "recalibrate for this model"
            )

    # -- persistence ---------------------------------------------------------------------------
    def _json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "meta": self.meta,
            "model_class": self.model_class,
            "fingerprint": self.fingerprint,
            "config": self.config.to_dict(),
            "groups": self.groups.to_dict(),
            "subgraphs": self.subgraphs,
            "calls": self.calls,
            "nodes": [n._json() for n in self.nodes.values()],
            "probe": None if self.probe is None else self.probe[0],
            "allocation": None if self.allocation is None else self.allocation.to_dict(),
            "act_floor": None if self.act_floor is None else self.act_floor.to_dict(),
            "attention": None if self.attention is None else self.attention.to_dict(),
            "tables": {k: {"fmt": w.fmt, "shape": list(w.shape)} for k, w in self.tables.items()},
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for n in self.nodes.values():
            if n.group_weights is not None:
                for label, w in n.stored_weights().items():
                    out[f"nodes/{n.key}/weight@{label}"] = w.data
                    out[f"nodes/{n.key}/weight_scale@{label}"] = w.scale
            elif n.weight is not None:
                out[f"nodes/{n.key}/weight"] = n.weight.data
                out[f"nodes/{n.key}/weight_scale"] = n.weight.scale
            if n.call_log is not None:
                out[f"nodes/{n.key}/call_log"] = n.call_log
            if n.bias_correction is not None:
                out[f"nodes/{n.key}/bias_correction"] = n.bias_correction
            if n.smooth is not None:
                out[f"nodes/{n.key}/smooth"] = n.smooth
        for k, w in self.tables.items():
            out[f"tables/{k}/weight"] = w.data
            out[f"tables/{k}/weight_scale"] = w.scale
        if self.probe is not None:
            out.update(self.probe[1])
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan to one safetensors file (atomically: a temp file, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(self._tensors(), str(tmp), metadata={METADATA_KEY: json.dumps(self._json())})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantPlan":
        """Read and validate a plan file; raises :class:`PlanFileError` naming what is wrong."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise PlanFileError(f"plan file '{path}' does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise PlanFileError(f"plan file '{path}' is truncated or not a safetensors file: {e}") from e
        if METADATA_KEY not in metadata:
            raise PlanFileError(f"'{path}' is a safetensors file but not a qdiff plan (no '{METADATA_KEY}' metadata)")
        try:
            doc = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise PlanFileError(f"plan file '{path}' has corrupt plan metadata: {e}") from e
        version = doc.get("format_version")
        if version not in READABLE_VERSIONS:
            raise PlanFileError(
                f"plan file '{path}' has format version {version!r}; this qdiff ({__version__}) reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        return _from_doc(doc, tensors, path)


def _expect(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...] | None, path: Path, node: str,
            what: str = "node") -> torch.Tensor:
    if name not in tensors:
        raise PlanFileError(f"plan file '{path}': {what} '{node}' is missing tensor '{name}'")
    t = tensors.pop(name)
    if t.dtype != dtype or (shape is not None and tuple(t.shape) != tuple(shape)):
        raise PlanFileError(
            f"plan file '{path}': {what} '{node}' tensor '{name}' is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}"
        )
    return t


def _split_points(nd: dict[str, Any], shape: tuple[int, ...], kind: OpKind, path: Path) -> tuple[int, ...] | None:
    """A node's split points (absent in plans without split shortcuts), checked against its weight."""
    split = nd.get("split")
    stored = (nd["weight"] or {}).get("splits")
    if split is None and stored is None:
        return None
    cin = shape[0] if kind is OpKind.CONV_TRANSPOSE else shape[1]
    ok = (
        isinstance(split, list) and split == stored and len(split) >= 3 and all(isinstance(p, int) for p in split)
        and split[0] == 0 and split[-1] == cin and all(b > a for a, b in zip(split, split[1:]))
    )
    if not ok or kind is not OpKind.LINEAR and nd["conv_args"].get("groups", 1) != 1:
        raise PlanFileError(
            f"plan file '{path}': node '{nd['key']}' has invalid split points {split} (weight: {stored}) "
            f"for {cin} input channels"
        )
    return tuple(split)


def _stored_weight(wd: dict[str, Any], tensors: dict[str, torch.Tensor], suffix: str, shape: tuple[int, ...], kind: OpKind,
                   split: tuple[int, ...] | None, path: Path, key: str) -> QuantizedWeight:
    """One weight of a node (tensors ``weight<suffix>`` / ``weight_scale<suffix>``), checked against its format."""
    fmt, gs = wd["fmt"], wd["group_size"]
    if fmt not in _STORAGE_DTYPES:
        raise PlanFileError(f"plan file '{path}': node '{key}' has a weight of unknown format {fmt!r}")
    if (wd.get("splits") is None) != (split is None) or (split is not None and tuple(wd["splits"]) != split):
        raise PlanFileError(f"plan file '{path}': node '{key}' weight{suffix} has split points {wd.get('splits')}, the node {split}")
    out = shape[1] if kind is OpKind.CONV_TRANSPOSE else shape[0]
    dshape, sshape = storage_shape(fmt, out, int(torch.tensor(shape).prod()) // out, gs, split)
    data = _expect(tensors, f"nodes/{key}/weight{suffix}", _STORAGE_DTYPES[fmt], dshape, path, key)
    scale = _expect(tensors, f"nodes/{key}/weight_scale{suffix}", torch.float32, sshape, path, key)
    return QuantizedWeight(fmt, data, scale, shape, kind.value, gs, split)


def _group_weights(nd: dict[str, Any], tensors: dict[str, torch.Tensor], shape: tuple[int, ...], kind: OpKind,
                   split: tuple[int, ...] | None, groups: int, path: Path) -> list[QuantizedWeight | None]:
    """A node's per-group weights: one stored weight per label, shared by the groups that name it."""
    key, labels, stored = nd["key"], nd["group_weights"], nd.get("weights")
    if not isinstance(labels, list) or len(labels) != groups or not isinstance(stored, dict):
        raise PlanFileError(f"plan file '{path}': node '{key}' has per-group weights {labels!r} for {groups} groups")
    if set(stored) != {lb for lb in labels if lb is not None}:
        raise PlanFileError(f"plan file '{path}': node '{key}' stores weights {sorted(stored)} but its groups use {labels}")
    weights = {}
    for label, wd in stored.items():
        w = _stored_weight(wd, tensors, f"@{label}", shape, kind, split, path, key)
        if weight_label(w) != label:
            raise PlanFileError(f"plan file '{path}': node '{key}' weight@{label} holds {weight_label(w)}")
        weights[label] = w
    return [None if lb is None else weights[lb] for lb in labels]


def _allocation(d: dict[str, Any], nodes: dict[str, NodePlan], path: Path) -> AllocationRecord:
    """The allocation record, checked against the nodes: every allocated node exists and holds its chosen format."""
    try:
        rec = AllocationRecord.from_dict(d)
    except (TypeError, ValueError) as e:
        raise PlanFileError(f"plan file '{path}' has an invalid bit allocation record: {e}") from e
    for key, entry in rec.nodes.items():
        node = nodes.get(key)
        if node is None:
            raise PlanFileError(f"plan file '{path}': the bit allocation names node '{key}', which the plan does not have")
        for g, choice in enumerate(rec.group_choices(key)):
            w = node.weight_for(g)
            if not candidate_holds(choice, None if w is None else w.fmt, None if w is None else w.group_size):
                held = "a float" if w is None else weight_label(w)
                raise PlanFileError(
                    f"plan file '{path}': node '{key}' holds {held} weight in group {g} but its bit allocation chose {choice}"
                )
    return rec


def _check_outliers(acts: list[ActQParams | None], key: str, path: Path) -> None:
    """Outlier quantizers only where the op applies them (each slice, or an unsplit input) and on int8 inputs."""
    for g, a in enumerate(acts):
        if a is None:
            continue
        misplaced = a.slices is not None and a.outlier is not None
        wrong_fmt = any(p.outlier is not None and p.fmt != "int8" for p in a.parts())
        if misplaced or wrong_fmt:
            raise PlanFileError(
                f"plan file '{path}': node '{key}' has an outlier quantizer in group {g} "
                f"{'on the whole tensor of a split input (they belong to the slices)' if misplaced else 'on a non-int8 input'}"
            )


def _act_floor(d: dict[str, Any], nodes: dict[str, NodePlan], groups: int, path: Path) -> ActFloorRecord:
    """The activation floor record, checked against the nodes: no quantized node quantizes activations in an A16 group."""
    try:
        rec = ActFloorRecord.from_dict(d)
    except (TypeError, ValueError) as e:
        raise PlanFileError(f"plan file '{path}' has an invalid activation floor record: {e}") from e
    if len(rec.measured_db) != groups:
        raise PlanFileError(f"plan file '{path}': the activation floor record has {len(rec.measured_db)} groups, the plan {groups}")
    for n in nodes.values():
        bad = [g for g in rec.a16_groups if n.quantized and n.acts[g] is not None]
        if bad:
            raise PlanFileError(f"plan file '{path}': node '{n.key}' quantizes its input in group {bad[0]}, which the activation floor keeps at 16 bits")
    return rec


def _attention(d: dict[str, Any] | None, config: QuantConfig, groups: int, path: Path) -> AttentionRecord | None:
    """The attention record (absent in older plans), validated and present exactly when the config quantizes attention."""
    if (d is None) != (config.attention is None):
        raise PlanFileError(
            f"plan file '{path}': its config {'quantizes' if config.attention is not None else 'does not quantize'} attention "
            f"but the plan {'has no' if d is None else 'has an'} attention record"
        )
    if d is None:
        return None
    try:
        return AttentionRecord.from_dict(d, groups)
    except ValueError as e:
        raise PlanFileError(f"plan file '{path}' has an invalid attention record: {e}") from e


def _tables(d: dict[str, Any] | None, config: QuantConfig, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, QuantizedWeight]:
    """The int8 embedding tables (absent in older plans), each checked against its stored shape; only in plans whose config
    stores tables int8."""
    d = d or {}
    if d and config.embedding_tables is None:
        raise PlanFileError(f"plan file '{path}' stores int8 tables {sorted(d)[:3]} but its config keeps tables in float")
    out = {}
    for name, td in d.items():
        if td.get("fmt") != "int8" or not (isinstance(td.get("shape"), list) and len(td["shape"]) == 2):
            raise PlanFileError(f"plan file '{path}': table '{name}' is {td}, expected an int8 table of 2 dims")
        shape = tuple(td["shape"])
        dshape, sshape = storage_shape("int8", shape[0], shape[1], None)
        data = _expect(tensors, f"tables/{name}/weight", torch.int8, dshape, path, name, "table")
        scale = _expect(tensors, f"tables/{name}/weight_scale", torch.float32, sshape, path, name, "table")
        out[name] = QuantizedWeight("int8", data, scale, shape, OpKind.LINEAR.value)
    return out


def _from_doc(doc: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> QuantPlan:
    try:
        config = QuantConfig.from_dict(doc["config"])
        groups = TimestepGroups.from_dict(doc["groups"])
        nodes: dict[str, NodePlan] = {}
        for nd in doc["nodes"]:
            key, kind, shape = nd["key"], OpKind(nd["kind"]), tuple(nd["weight_shape"])
            weight, group_weights = None, None
            split = _split_points(nd, shape, kind, path)
            if nd.get("group_weights") is not None:
                group_weights = _group_weights(nd, tensors, shape, kind, split, groups.count, path)
                weight = next((w for w in group_weights if w is not None), None)
                if weight is None or (nd["weight"] or {}).get("fmt") != weight.fmt:
                    raise PlanFileError(f"plan file '{path}': node '{key}' has per-group weights {nd['group_weights']} that do not match its weight {nd['weight']}")
            elif nd["weight"] is not None:
                weight = _stored_weight(nd["weight"], tensors, "", shape, kind, split, path, key)
            acts = [None if a is None else ActQParams.from_dict(a) for a in nd["acts"]]
            if len(acts) != groups.count:
                raise PlanFileError(f"plan file '{path}': node '{key}' has {len(acts)} activation quantizers for {groups.count} groups")
            want = None if split is None else len(split) - 1
            bad = [g for g, a in enumerate(acts) if a is not None and (None if a.slices is None else len(a.slices)) != want]
            if bad:
                raise PlanFileError(
                    f"plan file '{path}': node '{key}' has an activation quantizer in group {bad[0]} whose slices do not "
                    f"match its split points {split}"
                )
            _check_outliers(acts, key, path)
            call_log = _expect(tensors, f"nodes/{key}/call_log", torch.float32, None, path, key) if nd["has_call_log"] else None
            corr = None
            if nd["has_bias_correction"]:
                out = shape[1] if kind is OpKind.CONV_TRANSPOSE else shape[0]
                corr = _expect(tensors, f"nodes/{key}/bias_correction", torch.float32, (groups.count, out), path, key)
            smooth = None
            if nd.get("has_smooth"):
                cin = shape[0] if kind is OpKind.CONV_TRANSPOSE else shape[1]
                smooth = _expect(tensors, f"nodes/{key}/smooth", torch.float32, (cin,), path, key)
            nodes[key] = NodePlan(
                key, kind, nd["weight_name"], shape, _json_conv_args(nd["conv_args"]), weight, acts, nd["reason"],
                None if nd["input_shape"] is None else tuple(nd["input_shape"]), nd["stats"], call_log, corr, smooth,
                split, nd.get("split_note"), group_weights,
            )
        probe = None
        if doc["probe"] is not None:
            probe_tensors = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("probe/")]}
            probe = (doc["probe"], probe_tensors)
        tables = _tables(doc.get("tables"), config, tensors, path)
    except (KeyError, TypeError, ValueError) as e:
        raise PlanFileError(f"plan file '{path}' has invalid plan metadata: {type(e).__name__}: {e}") from e
    if tensors:
        raise PlanFileError(f"plan file '{path}' holds tensors no node uses: {sorted(tensors)[:5]}")
    plan = QuantPlan(config, nodes, groups, doc["subgraphs"], doc["model_class"], doc["calls"], probe, doc["meta"])
    plan.tables = tables
    if doc.get("allocation") is not None:
        plan.allocation = _allocation(doc["allocation"], nodes, path)
    if doc.get("act_floor") is not None:
        plan.act_floor = _act_floor(doc["act_floor"], nodes, groups.count, path)
    plan.attention = _attention(doc.get("attention"), config, groups.count, path)
    if plan.fingerprint != doc["fingerprint"]:
        raise PlanFileError(f"plan file '{path}': stored fingerprint {doc['fingerprint']} does not match its nodes ({plan.fingerprint})")
    if plan.meta.get("torch_version", "").split("+")[0] != torch.__version__.split("+")[0]:
        warnings.warn(
            f"plan '{path}' was made with torch {plan.meta.get('torch_version')}, running torch {torch.__version__}",
            stacklevel=3,
        )
    return plan
