"""Quantization configuration: frozen, validated, versioned, serializable.

A :class:`QuantConfig` says *what* to quantize and *how*; it holds no data. Presets cover the
common cases (``QuantConfig.preset("w8a8-int8")``); everything else is a ``replace`` away.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError


class Format(str, enum.Enum):
    """Number formats a tensor can be stored or computed in."""

    INT8 = "int8"
    INT4 = "int4"
    INT6 = "int6"  # weights only: stored as int8 in [-32, 31], one scale per output channel
    INT5 = "int5"  # weights only: stored as int8 in [-16, 15], one scale per output channel
    FP8_E4M3 = "fp8_e4m3"

    @property
    def bits(self) -> int:
        return {Format.INT8: 8, Format.INT4: 4, Format.INT5: 5, Format.INT6: 6, Format.FP8_E4M3: 8}[self]

    @property
    def is_int(self) -> bool:
        return self in (Format.INT8, Format.INT4, Format.INT5, Format.INT6)


class RangeMethod(str, enum.Enum):
    """How an activation's clipping range is chosen from calibration data."""

    MINMAX = "minmax"  # raw observed min/max (the naive baseline)
    PERCENTILE = "percentile"  # a percentile of the observed values
    MSE = "mse"  # the range minimizing quantization MSE on the sampled values


class OpKind(str, enum.Enum):
    """Kinds of quantizable operations, found by what the graph computes."""

    LINEAR = "linear"
    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"


class FirstLastPolicy(str, enum.Enum):
    """What to do with the first and last quantizable op (in graph order)."""

    QUANTIZE = "quantize"  # like every other op
    EIGHT_BIT = "8bit"  # at least 8-bit weights (INT8 instead of INT4)
    SKIP = "skip"  # keep in full precision


class Rounding(str, enum.Enum):
    """How integer weight values are rounded onto their (already chosen) scale grids."""

    NEAREST = "nearest"  # round to nearest
    GPTQ = "gptq"  # linears: column by column, compensating the error through the inverse input Hessian (GPTQ)
    LEARNED = "learned"  # linears: down or up per value, learned on the calibration inputs' output error (AdaRound)
    JOINT = "joint"  # LEARNED per linear, then all integer linears refined together on the denoiser output (qcompile.reconstruct)

    @property
    def per_layer(self) -> "Rounding":
        """The rounding each weight gets on its own (JOINT: LEARNED; the joint step follows at plan level)."""
        return Rounding.LEARNED if self is Rounding.JOINT else self


@dataclass(frozen=True)
class WeightSpec:
    """Weight quantization: symmetric, per output channel or per group of input features."""

    fmt: Format
    group_size: int | None = None  # None: one scale per output channel
    clip_search: bool = True  # search per-channel/group clipping for minimal (importance-weighted) MSE
    min_clip: float = 0.8  # smallest clipping ratio of the absolute maximum the search may pick
    rounding: Rounding = Rounding.NEAREST  # integer linear weights with a Gram matrix: GPTQ or learned rounding
    rounding_iters: int = 300  # learned rounding: optimizer steps per run, two runs per weight (cost ~ 12 x iters x out x K^2)
    joint_iters: int = 2000  # joint rounding: steps (one kept denoiser call's forward and backward each)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fmt", Format(self.fmt))
        object.__setattr__(self, "rounding", Rounding(self.rounding))
        if self.rounding is not Rounding.NEAREST and not self.fmt.is_int:
            raise ConfigError(f"{self.rounding.value} rounding applies to integer weights, not {self.fmt.value}")
        for name in ("rounding_iters", "joint_iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if not 0.0 < self.min_clip <= 1.0:
            raise ConfigError(f"min_clip must be in (0, 1], got {self.min_clip}")
        if self.group_size is not None:
            if self.fmt is not Format.INT4:
                raise ConfigError(f"group_size is only supported for int4 weights, not {self.fmt.value}")
            if self.group_size <= 0 or self.group_size % 8:
                raise ConfigError(f"group_size must be a positive multiple of 8, got {self.group_size}")

    @property
    def bits(self) -> int:
        return self.fmt.bits


@dataclass(frozen=True)
class ActSpec:
    """Static per-tensor activation quantization (the input of each quantized op)."""

    fmt: Format
    symmetric: bool = False  # int only; fp8 is always symmetric
    range_method: RangeMethod = RangeMethod.MSE
    percentile: float = 99.99

    def __post_init__(self) -> None:
        object.__setattr__(self, "fmt", Format(self.fmt))
        object.__setattr__(self, "range_method", RangeMethod(self.range_method))
        if self.fmt in (Format.INT4, Format.INT5, Format.INT6):
            raise ConfigError(f"{self.fmt.bits}-bit activations are not supported; use int8 or fp8_e4m3")
        if self.fmt is Format.FP8_E4M3 and not self.symmetric:
            object.__setattr__(self, "symmetric", True)
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")

    @property
    def bits(self) -> int:
        return self.fmt.bits


@dataclass(frozen=True)
class CalibrationSpec:
    """How calibration observes the sampling trajectory."""

    timestep_args: tuple[str, ...] = ("timestep", "t", "timesteps")
    reservoir_size: int = 16384  # activation values sampled per node and timestep group
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "timestep_args", tuple(self.timestep_args))
        if self.reservoir_size < 256:
            raise ConfigError(f"reservoir_size must be >= 256, got {self.reservoir_size}")
        if not self.timestep_args:
            raise ConfigError("timestep_args must name at least one argument")


class Estimator(str, enum.Enum):
    """How bit allocation gets each node's output distortion D_n(b)."""

    MEASURED = "measured"  # one forward per node, candidate and kept call: only that node quantized
    FISHER = "fisher"  # analytic node-output error x output sensitivity from a few backward passes


# Allocation candidates: name -> (weight format or None for full precision, int4 group size, rate in bits per weight).
# int4 candidates are group-wise (fp32 scales); the rate of "int4" (g64 or the base spec's groups) is counted as
# 4 bits, and "int4g32" adds the extra scale storage over g64 (32 bits per 64 weights): 4.5 bits.
CANDIDATES: dict[str, tuple[str | None, int | None, float]] = {
    "int4": ("int4", 64, 4.0),
    "int4g32": ("int4", 32, 4.5),
    "int5": ("int5", None, 5.0),
    "int6": ("int6", None, 6.0),
    "int8": ("int8", None, 8.0),
    "fp8_e4m3": ("fp8_e4m3", None, 8.0),
    "bf16": (None, None, 16.0),  # op kept in full precision
}
CANDIDATE_BITS = {name: bits for name, (_, _, bits) in CANDIDATES.items()}


def candidate_holds(candidate: str, fmt: str | None, group_size: int | None) -> bool:
    """Whether a stored weight (format, int4 group size; ``fmt=None``: full precision) is what ``candidate`` makes."""
    want, group, _ = CANDIDATES[candidate]
    return want == fmt and (candidate != "int4g32" or group_size == group)


@dataclass(frozen=True)
class AllocationSpec:
    """Rate-distortion bit allocation, used when ``QuantConfig.weight_bit_budget`` is set.

    ``per_group``: every timestep group gets its own bit-widths (temporal mixed precision): one
    Lagrangian over (node, group) pairs, whose budget is the average weight bits over groups
    weighted by each group's share of denoiser calls. Otherwise one allocation serves all groups.
    """

    candidates: tuple[str, ...] = ("int4", "int6", "int8", "fp8_e4m3", "bf16")
    calls_per_group: int = 4  # denoiser calls kept per timestep group to measure output distortion on
    estimator: Estimator = Estimator.MEASURED
    probes: int = 2  # random output projections per kept call (fisher estimator)
    per_group: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))
        object.__setattr__(self, "estimator", Estimator(self.estimator))
        unknown = [c for c in self.candidates if c not in CANDIDATES]
        if unknown:
            raise ConfigError(f"unknown allocation candidate(s) {unknown}; choose from {list(CANDIDATES)}")
        if len(set(self.candidates)) < 2:
            raise ConfigError(f"bit allocation needs at least two distinct candidates, got {list(self.candidates)}")
        if self.calls_per_group < 1 or self.probes < 1:
            raise ConfigError(f"calls_per_group and probes must be >= 1, got {self.calls_per_group}, {self.probes}")
        if not isinstance(self.per_group, bool):
            raise ConfigError(f"per_group must be a bool, got {self.per_group!r}")

    def bit_range(self) -> tuple[float, float]:
        bits = [CANDIDATE_BITS[c] for c in self.candidates]
        return min(bits), max(bits)

    def weight_spec(self, candidate: str, base: WeightSpec) -> WeightSpec | None:
        """The weight spec of a candidate (None: full precision); "int4" keeps the base's group size, or 64."""
        fmt, group, _ = CANDIDATES[candidate]
        if fmt is None:
            return None
        if candidate == "int4" and base.fmt is Format.INT4 and base.group_size:
            group = base.group_size
        rounding = base.rounding if Format(fmt).is_int else Rounding.NEAREST  # every candidate is rounded as the final plan
        return WeightSpec(Format(fmt), group, base.clip_search, base.min_clip, rounding, base.rounding_iters, base.joint_iters)


_ALL_OPS = frozenset(OpKind)
# the w8a8-fp8-attn preset's attention quantizer: e4m3 keeps 2^-9 relative precision down to 2^-6 x scale, so the
# absolute maximum (no clipping) loses little and never saturates a q / k outlier that would dominate the softmax
ATTENTION_FP8 = ActSpec(Format.FP8_E4M3, range_method=RangeMethod.MINMAX)
GROUP_BOUNDARIES = ("uniform", "segment")  # equal numbers of steps / data-driven (qcompile.segment)


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. Build with :meth:`preset` and adjust with :meth:`replace`."""

    weight: WeightSpec
    act: ActSpec | None = None  # None: weight-only quantization
    ops: frozenset[OpKind] = _ALL_OPS
    skip_names: tuple[str, ...] = ()  # fnmatch patterns on node keys (qualified weight names)
    first_last: FirstLastPolicy = FirstLastPolicy.QUANTIZE
    bias_correction: bool = True  # cancel the mean output shift of weight quantization per group
    smooth_alpha: float | None = None  # SmoothQuant migration strength for quantized activations
    split_shortcuts: bool = True  # per-slice scales for ops reading a channel concat (passes/provenance.py)
    weight_bit_budget: float | None = None  # average weight bits over the quantized ops (None: uniform `weight`)
    allocation: AllocationSpec = field(default_factory=AllocationSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    # fp8 attention: q / k / v of each supported scaled_dot_product_attention quantized to e4m3 with static per-tensor
    # scales (per timestep group), fp8 probabilities (passes/attention_sites.py; None: attention stays in full precision)
    attention: ActSpec | None = None
    timestep_groups: int | str = 1  # activation quantizers per group of timesteps; "auto": chosen by segmentation
    group_boundaries: str = "uniform"  # "uniform" in step index, or "segment" where activation ranges change most
    # int8 activations: a second, sparse quantizer for the values beyond the inlier range where that improves the
    # input's estimated SQNR by more than this many dB (per input, slice and timestep group; None: off)
    outlier_split_db: float | None = None
    # after calibration, timestep groups whose measured output SQNR (worst calibration step) is below this many dB
    # keep activations unquantized (16-bit in deployment: W8A16 for that group); None: off
    group_act_floor_db: float | None = None
    # lookup tables (the weights of F.embedding calls that are module state, e.g. class-label tables) stored int8 with
    # one scale per row (passes/tables.py; None: kept in float). The w4 presets set it: there weight bytes are the point
    embedding_tables: Format | None = None
    name: str = "custom"

    # 4: WeightSpec.rounding (an enum) replaces the bool WeightSpec.gptq; `attention` (added in 4, absent in older dicts: None)
    # 5: `embedding_tables` (absent in version 4 dicts: None, tables in float)
    VERSION: ClassVar[int] = 5
    PRESETS: ClassVar[tuple[str, ...]] = ("w8a8-int8", "w8a8-fp8", "w4a8", "w4a16", "w8a8-fp8-attn")

    def __post_init__(self) -> None:
        if not isinstance(self.weight, WeightSpec):
            raise ConfigError(f"weight must be a WeightSpec, got {type(self.weight).__name__}")
        if self.act is not None and not isinstance(self.act, ActSpec):
            raise ConfigError(f"act must be an ActSpec or None, got {type(self.act).__name__}")
        object.__setattr__(self, "ops", frozenset(OpKind(o) for o in self.ops))
        object.__setattr__(self, "skip_names", tuple(self.skip_names))
        object.__setattr__(self, "first_last", FirstLastPolicy(self.first_last))
        if not self.ops:
            raise ConfigError("ops is empty: nothing would be quantized")
        if not isinstance(self.split_shortcuts, bool):
            raise ConfigError(f"split_shortcuts must be a bool, got {self.split_shortcuts!r}")
        if self.smooth_alpha is not None and not 0.0 < self.smooth_alpha < 1.0:
            raise ConfigError(f"smooth_alpha must be in (0, 1) or None, got {self.smooth_alpha}")
        k = self.timestep_groups
        if k != "auto" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"timestep_groups must be a positive int or 'auto', got {k!r}")
        if self.group_boundaries not in GROUP_BOUNDARIES:
            raise ConfigError(f"group_boundaries must be one of {GROUP_BOUNDARIES}, got {self.group_boundaries!r}")
        if k == "auto" and self.group_boundaries != "segment":
            object.__setattr__(self, "group_boundaries", "segment")  # "auto" picks the count by segmentation
        for name in ("outlier_split_db", "group_act_floor_db"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number of dB or None, got {v!r}")
            if self.act is None or self.act.fmt is not Format.INT8:
                raise ConfigError(f"{name} needs int8 activations (act=ActSpec(Format.INT8)), got act={None if self.act is None else self.act.fmt.value}")
            object.__setattr__(self, name, float(v))
        if self.outlier_split_db is not None and self.outlier_split_db < 0:
            raise ConfigError(f"outlier_split_db must be >= 0 (a gain in dB), got {self.outlier_split_db}")
        if not isinstance(self.allocation, AllocationSpec):
            raise ConfigError(f"allocation must be an AllocationSpec, got {type(self.allocation).__name__}")
        if self.allocation.per_group and self.smooth_alpha is not None:
            raise ConfigError("allocation.per_group does not combine with smooth_alpha (a node's smoothing would differ between groups)")
        if self.weight_bit_budget is not None:
            lo, hi = self.allocation.bit_range()
            if not lo <= self.weight_bit_budget <= hi:
                raise ConfigError(
                    f"weight_bit_budget {self.weight_bit_budget} is outside [{lo:g}, {hi:g}], the bits of the allocation "
                    f"candidates {list(self.allocation.candidates)}"
                )
        if self.embedding_tables is not None:
            if self.embedding_tables not in (Format.INT8, Format.INT8.value):
                raise ConfigError(f"embedding_tables must be int8 or None, got {self.embedding_tables!r}")
            object.__setattr__(self, "embedding_tables", Format.INT8)
        if self.attention is not None:
            if not isinstance(self.attention, ActSpec):
                raise ConfigError(f"attention must be an ActSpec or None, got {type(self.attention).__name__}")
            if self.attention.fmt is not Format.FP8_E4M3:
                raise ConfigError(f"attention quantization is fp8_e4m3 only (the qdiff::fp8_attention kernel), got {self.attention.fmt.value}")

    @classmethod
    def preset(cls, name: str) -> "QuantConfig":
        """A named preset: ``w8a8-int8``, ``w8a8-fp8``, ``w4a8``, ``w4a16`` or ``w8a8-fp8-attn`` (w8a8-fp8 plus fp8 attention)."""
        int8_act = ActSpec(Format.INT8, symmetric=False)
        presets = {
            "w8a8-int8": cls(WeightSpec(Format.INT8), int8_act, name="w8a8-int8"),
            "w8a8-fp8": cls(WeightSpec(Format.FP8_E4M3), ActSpec(Format.FP8_E4M3), name="w8a8-fp8"),
            "w4a8": cls(
                WeightSpec(Format.INT4, group_size=64),
                int8_act,
                first_last=FirstLastPolicy.EIGHT_BIT,
                embedding_tables=Format.INT8,
                name="w4a8",
            ),
            "w4a16": cls(
                WeightSpec(Format.INT4, group_size=64),
                None,
                first_last=FirstLastPolicy.EIGHT_BIT,
                embedding_tables=Format.INT8,
                name="w4a16",
            ),
        }
        presets["w8a8-fp8-attn"] = presets["w8a8-fp8"].replace(attention=ATTENTION_FP8, name="w8a8-fp8-attn")
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return presets[name]

    def replace(self, **changes: Any) -> "QuantConfig":
        """A copy with fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def naive(self) -> "QuantConfig":
        """The round-to-nearest baseline of this config: min/max ranges, no clipping search, no bias
        correction, no smoothing, one activation scale per tensor (no split shortcuts, no outlier split, no activation floor)."""
        weight = dataclasses.replace(self.weight, clip_search=False)
        act = None if self.act is None else dataclasses.replace(self.act, range_method=RangeMethod.MINMAX)
        return dataclasses.replace(self, weight=weight, act=act, bias_correction=False, smooth_alpha=None, split_shortcuts=False,
                                   outlier_split_db=None, group_act_floor_db=None, name=f"{self.name}-naive")

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (enums as their values), with the config version."""

        def enc(v: Any) -> Any:
            if isinstance(v, enum.Enum):
                return v.value
            if dataclasses.is_dataclass(v):
                return {f.name: enc(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, (frozenset, set)):
                return sorted(enc(x) for x in v)
            if isinstance(v, tuple):
                return [enc(x) for x in v]
            return v

        return {"version": self.VERSION, **enc(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        """Inverse of :meth:`to_dict`; refuses unknown versions and fields."""
        d = dict(d)
        version = d.pop("version", None)
        if version == 1:  # version 1 kept timestep_groups in CalibrationSpec
            d["calibration"] = dict(d.get("calibration", {}))
            d["timestep_groups"] = d["calibration"].pop("timestep_groups", 1)
            version = 2
        if version == 2:  # version 2 had no outlier split and no activation floor (their defaults: off)
            version = 3
        if version == 3:  # version 3 said gptq: bool
            d["weight"] = dict(d.get("weight", {}))
            if d["weight"].pop("gptq", False):
                d["weight"]["rounding"] = Rounding.GPTQ.value
            version = 4
        if version == 4:  # version 4 had no embedding_tables (its default: None)
            version = 5
        if version != cls.VERSION:
            raise ConfigError(f"QuantConfig version {version!r} is not supported (this qdiff reads {cls.VERSION})")
        try:
            act = d.pop("act")
            attention = d.pop("attention", None)  # absent in older configs: attention in full precision
            return cls(
                weight=WeightSpec(**d.pop("weight")),
                act=None if act is None else ActSpec(**act),
                calibration=CalibrationSpec(**d.pop("calibration")),
                allocation=AllocationSpec(**d.pop("allocation", {})),
                attention=None if attention is None else ActSpec(**attention),
                **d,
            )
        except (TypeError, KeyError, ValueError) as e:
            raise ConfigError(f"invalid QuantConfig dict: {e}") from e
