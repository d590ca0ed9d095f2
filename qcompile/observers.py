"""Activation statistics gathered in calibration, and the choice of static ranges from them.

Each (site, timestep group) keeps the exact min/max, a uniform sample of the values it saw
(bottom-k sampling with random keys, so every denoiser call contributes in proportion to its
size) and a per-call min/max log. Ranges are then chosen by min/max, a percentile, or the
clipping that minimizes quantization MSE on the sampled values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .config import ActSpec, RangeMethod
from .lowering.formats import fake_quantize, int_range, qmax_of

MSE_GRID_SYMMETRIC = 64  # clipping ratios searched for symmetric ranges
MSE_GRID_ASYMMETRIC = 24  # per side, for asymmetric ranges (24 x 24 pairs)
MIN_RATIO = 0.02
TAIL = 64  # largest and smallest values kept exactly, so MSE clipping sees the outliers
# Outlier split: candidate shares of values (per side) moved to the sparse outlier tensor; at most 1 %
OUTLIER_SHARES = (0.0, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
MAX_OUTLIER_SHARE = 0.02  # candidates whose outlier tensor would hold more (ties at the quantile) are not sparse: refused
OUTLIER_QMAX = 127  # the outlier tensor is symmetric int8
ROW_BLOCK = 1 << 16  # values per block of rows whose squares are summed at once (features-last inputs)


def _tail(rows: torch.Tensor, row_ext: torch.Tensor, largest: bool) -> torch.Tensor:
    """The ``TAIL`` largest (or smallest) values of ``rows``, sorted, given each row's max (or min) ``row_ext``.

    The k-th largest row max bounds the k-th largest value from below (k rows hold a value at least that
    large), so only the rows reaching it can hold the tail: one top-k over the row extremes and one over
    those rows replace a top-k over every value (the same values, far faster on CPU).
    """
    k = min(TAIL, rows.numel())
    if row_ext.numel() > k:
        bound = torch.topk(row_ext, k, largest=largest).values[-1]
        rows = rows[row_ext >= bound] if largest else rows[row_ext <= bound]
    return torch.topk(rows.reshape(-1), k, largest=largest).values


class ActivationStats:
    """Running statistics of one activation edge in one timestep group."""

    def __init__(self, reservoir_size: int, generator: torch.Generator, channel_dim: int | None = None, split: tuple[int, ...] | None = None):
        self.reservoir_size = reservoir_size
        self.channel_dim = channel_dim  # where the op's input features are (1 for convs, -1 for linears)
        self.split = split  # channel split points: then ``slices`` holds the statistics of each slice
        self.slices: list[ActivationStats] | None = None
        if split is not None:
            if channel_dim is None:
                raise ValueError("split statistics need the channel dim")
            self.slices = [ActivationStats(reservoir_size, generator, channel_dim) for _ in split[1:]]
        self.channel_sum: torch.Tensor | None = None  # float64 per-feature sums, for bias correction
        self.channel_sq_sum: torch.Tensor | None = None  # per-feature sums of squares, for weight importance
        self.channel_count = 0
        self.channel_min: torch.Tensor | None = None  # per-feature extremes, for smoothing
        self.channel_max: torch.Tensor | None = None
        self.channels = torch.empty(0, dtype=torch.long)  # the feature index of each sampled value
        self.generator = generator
        self.count = 0
        self.amin = float("inf")
        self.amax = float("-inf")
        self.values = torch.empty(0)
        self.keys = torch.empty(0)
        self.top = torch.empty(0)  # the TAIL largest values seen
        self.bottom = torch.empty(0)  # the TAIL smallest values seen
        self.call_log: list[tuple[int, float, float]] = []  # (call index, min, max)

    def update(self, x: torch.Tensor, call_index: int) -> None:
        """Add one call's activation ``x``.

        Every statistic but the per-feature sums is exact; the passes over ``x`` are few and make no
        activation-sized temporaries when ``x`` is a contiguous float32 tensor: min/max per row of :meth:`_rows`
        (which also give the per-feature extremes of convolution inputs and bound the exact tails, see :func:`_tail`),
        and the per-feature sums and sums of squares in float32 within rows of features, accumulated in float64.
        """
        x = x.detach()
        n = x.numel()
        if n == 0:
            return
        xf = x.float().contiguous()  # no copy for a contiguous float32 input
        flat = xf.view(-1)
        rows = self._rows(xf)
        row_lo, row_hi = rows.amin(dim=1), rows.amax(dim=1)
        lo, hi = float(row_lo.min()), float(row_hi.max())
        if math.isnan(lo) or math.isnan(hi):  # kept: Python's min / max would drop a nan
            self.amin = self.amax = math.nan
        else:
            self.amin, self.amax = min(self.amin, lo), max(self.amax, hi)
        self.count += n
        self.call_log.append((call_index, lo, hi))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return  # the caller rejects the statistics (calibrate: a clear error); no sample of nan / inf values
        if self.channel_dim is not None:
            self._update_channels(xf, row_lo, row_hi)
        self._keep_tails(_tail(rows, row_hi, True).cpu(), _tail(rows, row_lo, False).cpu())
        m = min(n, self.reservoir_size)
        idx = torch.randint(n, (m,), generator=self.generator, device="cpu")
        sample = flat[idx.to(flat.device)].cpu()
        # the m smallest of n uniform keys lie in [0, m/n]: scale so calls of any size mix fairly
        keys = torch.rand(m, generator=self.generator) * (m / n)
        channels = torch.zeros(m, dtype=torch.long)
        if self.channel_dim is not None:
            dim = self.channel_dim % x.dim()
            inner = math.prod(x.shape[dim + 1 :])
            channels = (idx // inner) % x.shape[dim]
        self._keep(sample, keys, channels)
        if self.slices is not None:
            dim = self.channel_dim % x.dim()
            if x.shape[dim] != self.split[-1]:
                raise ValueError(f"split points {self.split} do not fit an input with {x.shape[dim]} channels (shape {tuple(x.shape)})")
            for part, a, b in zip(self.slices, self.split, self.split[1:]):
                part.update(x.narrow(dim, a, b - a), call_index)

    def _rows(self, xf: torch.Tensor) -> torch.Tensor:
        """``xf`` (contiguous) as a 2-D view of runs of consecutive values: ``(outer * features, inner)`` when the
        features come before the last dim (each row within one feature), else ``(-1, last dim)``."""
        if xf.dim() == 0:
            return xf.view(1, 1)
        if self.channel_dim is not None:
            inner = math.prod(xf.shape[self.channel_dim % xf.dim() + 1 :])
            if inner > 1:
                return xf.view(-1, inner)
        return xf.view(-1, xf.shape[-1])

    def _update_channels(self, xf: torch.Tensor, row_lo: torch.Tensor, row_hi: torch.Tensor) -> None:
        """Per-feature sums, sums of squares and extremes of ``xf`` (float32); ``row_lo`` / ``row_hi``: the
        min / max of each row of :meth:`_rows`."""
        dim = self.channel_dim % xf.dim()
        c, inner = xf.shape[dim], math.prod(xf.shape[dim + 1 :])
        if inner == 1:  # features last (linear): reduce over the rows
            x2 = xf.reshape(-1, c)
            blocks = x2.split(max(1, ROW_BLOCK // c))  # float32 within blocks of rows (small squares), float64 across
            sums = torch.stack([b.sum(dim=0) for b in blocks]).double().sum(dim=0)
            sq = torch.stack([b.square().sum(dim=0) for b in blocks]).double().sum(dim=0)
            cmin, cmax = x2.amin(dim=0), x2.amax(dim=0)
        else:  # (outer, c, inner): float32 within each (outer, c) row, float64 across
            x3 = xf.reshape(-1, c, inner)
            sums = x3.sum(dim=2).double().sum(dim=0)
            sq = torch.linalg.vector_norm(x3, dim=2).double().pow(2).sum(dim=0)
            cmin, cmax = row_lo.view(-1, c).amin(dim=0), row_hi.view(-1, c).amax(dim=0)
        sums, sq, cmin, cmax = sums.cpu(), sq.cpu(), cmin.cpu(), cmax.cpu()
        self.channel_sum = sums if self.channel_sum is None else self.channel_sum + sums
        self.channel_sq_sum = sq if self.channel_sq_sum is None else self.channel_sq_sum + sq
        self.channel_count += xf.numel() // c
        self.channel_min = cmin if self.channel_min is None else torch.minimum(self.channel_min, cmin)
        self.channel_max = cmax if self.channel_max is None else torch.maximum(self.channel_max, cmax)

    def _keep(self, values: torch.Tensor, keys: torch.Tensor, channels: torch.Tensor) -> None:
        """Add sampled values with their keys, keeping the ``reservoir_size`` smallest keys."""
        values = torch.cat((self.values, values))
        keys = torch.cat((self.keys, keys))
        channels = torch.cat((self.channels, channels))
        if values.numel() > self.reservoir_size:
            keep = torch.topk(keys, self.reservoir_size, largest=False).indices
            values, keys, channels = values[keep], keys[keep], channels[keep]
        self.values, self.keys, self.channels = values, keys, channels

    def _keep_tails(self, top: torch.Tensor, bottom: torch.Tensor) -> None:
        top, bottom = torch.cat((self.top, top)), torch.cat((self.bottom, bottom))
        self.top = torch.topk(top, min(TAIL, top.numel())).values
        self.bottom = torch.topk(bottom, min(TAIL, bottom.numel()), largest=False).values

    def weighted_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, weights) standing for every value seen: the exact tails with weight 1 and the
        uniform sample of the body in between, weighted to the body's size."""
        if self.count <= 2 * TAIL or self.values.numel() == 0 or self.top.numel() == 0:
            return self.values, torch.ones_like(self.values)
        t_hi, t_lo = self.top.min(), self.bottom.max()
        body = self.values[(self.values < t_hi) & (self.values > t_lo)]
        n_body = max(self.count - self.top.numel() - self.bottom.numel(), 0)
        w_body = n_body / max(body.numel(), 1)
        values = torch.cat((body, self.top, self.bottom))
        weights = torch.cat((torch.full_like(body, w_body), torch.ones(self.top.numel() + self.bottom.numel())))
        return values, weights

    def merge(self, other: "ActivationStats") -> None:
        """Absorb another edge-group's statistics (same edge, other timesteps)."""
        self.count += other.count
        self.amin, self.amax = min(self.amin, other.amin), max(self.amax, other.amax)
        self.call_log = sorted(self.call_log + other.call_log)
        if other.channel_sum is not None:
            self.channel_sum = other.channel_sum.clone() if self.channel_sum is None else self.channel_sum + other.channel_sum
            self.channel_sq_sum = other.channel_sq_sum.clone() if self.channel_sq_sum is None else self.channel_sq_sum + other.channel_sq_sum
            self.channel_count += other.channel_count
            self.channel_min = other.channel_min.clone() if self.channel_min is None else torch.minimum(self.channel_min, other.channel_min)
            self.channel_max = other.channel_max.clone() if self.channel_max is None else torch.maximum(self.channel_max, other.channel_max)
        self._keep(other.values, other.keys, other.channels)
        self._keep_tails(other.top, other.bottom)
        if other.slices is not None:
            if self.slices is None:
                self.split = other.split
                self.slices = [ActivationStats(self.reservoir_size, self.generator, p.channel_dim) for p in other.slices]
            if self.split != other.split:
                raise ValueError(f"cannot merge statistics split at {other.split} into ones split at {self.split}")
            for mine, theirs in zip(self.slices, other.slices):
                mine.merge(theirs)

    def channel_mean(self) -> torch.Tensor | None:
        """Mean of each input feature over everything observed (float32), if tracked."""
        if self.channel_sum is None or self.channel_count == 0:
            return None
        return (self.channel_sum / self.channel_count).float()

    def channel_variance(self) -> torch.Tensor | None:
        """Variance of each input feature over everything observed (float32), if tracked."""
        mean = self.channel_mean()
        if mean is None:
            return None
        return (self.channel_sq_sum / self.channel_count - mean.double() ** 2).clamp_min(0).float()

    def smoothed(self, factors: torch.Tensor) -> "ActivationStats":
        """The statistics of ``x / factors`` (per input feature), from the per-feature sample.

        Exact extremes come from the per-feature min/max; the exact tails do not carry over
        (they were kept without their features), so the MSE search uses the sample alone.
        """
        f = factors.double()
        out = ActivationStats(self.reservoir_size, self.generator, self.channel_dim)
        out.count, out.call_log, out.channel_count = self.count, self.call_log, self.channel_count
        out.values = self.values / factors[self.channels]
        out.keys, out.channels = self.keys, self.channels
        out.channel_min, out.channel_max = self.channel_min / factors, self.channel_max / factors
        out.channel_sum, out.channel_sq_sum = self.channel_sum / f, self.channel_sq_sum / f**2
        out.amin, out.amax = float(out.channel_min.min()), float(out.channel_max.max())
        if self.slices is not None:
            out.split = self.split
            out.slices = [p.smoothed(factors[a:b]) for p, a, b in zip(self.slices, self.split, self.split[1:])]
        return out

    def channel_absmax(self) -> torch.Tensor | None:
        if self.channel_min is None:
            return None
        return torch.maximum(self.channel_min.abs(), self.channel_max.abs())

    def is_finite(self) -> bool:
        return math.isfinite(self.amin) and math.isfinite(self.amax)


@dataclass(frozen=True)
class OutlierQParams:
    """The second, sparse quantizer of an outlier-split input (symmetric int8, static).

    The op's input ``x`` is split exactly into ``x_in = clamp(x, lo, hi)`` (``[lo, hi]``: the inlier
    quantizer's grid range) and the residual ``x_out = x - x_in``, non-zero only where ``x`` lies beyond
    the inlier range; ``x_out`` is quantized with ``scale`` (zero stays exactly zero).
    """

    scale: float
    share: float  # estimated share of values beyond the inlier range (calibration data)
    gain_db: float  # estimated SQNR gain of the split over the single quantizer

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0 and 0.0 <= self.share <= 1.0 and math.isfinite(self.gain_db)):
            raise ValueError(f"invalid outlier quantizer: scale {self.scale}, share {self.share}, gain {self.gain_db} dB")


@dataclass(frozen=True)
class ActQParams:
    """A static activation quantizer: format, scale, zero point and the clipping range.

    A split edge (see ``passes/provenance.py``) also has ``slices``: the quantizer of each channel
    slice, which the op uses; the outer fields then describe the whole tensor (for reports).
    ``outlier``: the outlier split's second quantizer (``QuantConfig.outlier_split_db``; the fields above
    are then the inlier quantizer); ``outlier_gain_db``: the estimated gain of the best split, whether taken
    or not (None: not considered).
    """

    fmt: str
    symmetric: bool
    scale: float
    zero_point: int
    lo: float
    hi: float
    method: str
    slices: tuple["ActQParams", ...] | None = None
    outlier: OutlierQParams | None = None
    outlier_gain_db: float | None = None

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("slices", "outlier", "outlier_gain_db")}
        if self.slices is not None:
            d["slices"] = [s.to_dict() for s in self.slices]
        if self.outlier is not None:
            d["outlier"] = dict(self.outlier.__dict__)
        if self.outlier_gain_db is not None:
            d["outlier_gain_db"] = self.outlier_gain_db
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ActQParams":
        d = dict(d)
        slices = d.pop("slices", None)
        outlier = d.pop("outlier", None)
        return cls(
            **d, slices=None if slices is None else tuple(cls.from_dict(s) for s in slices),
            outlier=None if outlier is None else OutlierQParams(**outlier),
        )

    def parts(self) -> tuple["ActQParams", ...]:
        """The quantizers the op applies: one per slice of a split edge, else this one."""
        return self.slices if self.slices is not None else (self,)

    def slice_params(self) -> tuple[float | tuple[float, ...], int | tuple[int, ...]]:
        """(scale, zero point) the op uses: numbers, or tuples with one entry per slice."""
        if self.slices is None:
            return self.scale, self.zero_point
        return tuple(s.scale for s in self.slices), tuple(s.zero_point for s in self.slices)

    def outlier_scales(self) -> float | tuple[float, ...] | None:
        """The outlier quantizers' scales as the op takes them (per slice, 0.0 where a slice has none), or None."""
        if all(p.outlier is None for p in self.parts()):
            return None
        scales = tuple(0.0 if p.outlier is None else p.outlier.scale for p in self.parts())
        return scales if self.slices is not None else scales[0]


def qparams_from_range(fmt: str, symmetric: bool, lo: float, hi: float, method: str) -> ActQParams:
    """Scale and zero point that map ``[lo, hi]`` (widened to include 0) onto the format's grid."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    tiny = 1e-8
    if symmetric or fmt == "fp8_e4m3":
        amax = max(-lo, hi, tiny)
        return ActQParams(fmt, True, amax / qmax_of(fmt), 0, -amax, amax, method)
    qmin, qmax = int_range(fmt, False)
    scale = max(hi - lo, tiny) / (qmax - qmin)
    zp = int(min(max(round(qmin - lo / scale), qmin), qmax))
    return ActQParams(fmt, False, scale, zp, lo, hi, method)


def _mse(samples: torch.Tensor, weights: torch.Tensor, fmt: str, symmetric: bool, scales: torch.Tensor, zps: torch.Tensor) -> torch.Tensor:
    """Weighted MSE of fake quantization of ``samples`` for each (scale, zero point) candidate."""
    out = torch.empty(scales.numel())
    chunk = max(1, (1 << 22) // max(samples.numel(), 1))
    for i in range(0, scales.numel(), chunk):
        s = scales[i : i + chunk, None]
        z = zps[i : i + chunk, None]
        fq = fake_quantize(samples[None, :], fmt, s, z, symmetric)
        out[i : i + chunk] = ((fq - samples[None, :]).pow(2) * weights[None, :]).sum(dim=1) / weights.sum()
    return out


def choose_qparams(stats: ActivationStats, spec: ActSpec, outlier_db: float | None = None) -> ActQParams:
    """The static quantizer for an activation, by the spec's range method (with one per slice for split statistics).

    ``outlier_db`` (int8 only): each quantizer the op applies (each slice's, or the whole tensor's) gets an outlier
    split when that improves its estimated SQNR by more than this many dB (see :func:`with_outlier_split`).
    """
    pick = lambda s: _choose(s, spec) if outlier_db is None else with_outlier_split(s, _choose(s, spec), outlier_db)  # noqa: E731
    if stats.slices is None:
        return pick(stats)
    return dataclasses.replace(_choose(stats, spec), slices=tuple(pick(s) for s in stats.slices))


def _weighted_quantile(values: torch.Tensor, weights: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(values)
    v, cw = values[order], torch.cumsum(weights[order].double(), 0)
    idx = torch.searchsorted(cw / cw[-1], q.double().clamp(0, 1)).clamp(max=v.numel() - 1)
    return v[idx]


def _grid_range(q: ActQParams) -> tuple[float, float]:
    """The values an integer quantizer represents without clipping: ``[(qmin - zp) s, (qmax - zp) s]``."""
    qmin, qmax = int_range(q.fmt, q.symmetric)
    return (qmin - q.zero_point) * q.scale, (qmax - q.zero_point) * q.scale


def split_mse(values: torch.Tensor, weights: torch.Tensor, qs: list[ActQParams], outlier_scales: list[float]) -> torch.Tensor:
    """Weighted MSE of the outlier split for each candidate: ``x_in = clamp(x, grid)`` on ``qs[i]``, the residual
    ``x - x_in`` on a symmetric int8 quantizer of scale ``outlier_scales[i]`` (0: dropped, i.e. clipped)."""
    col = lambda v, dtype=torch.float32: torch.tensor(v, dtype=dtype)[:, None]  # noqa: E731
    ranges = [_grid_range(q) for q in qs]
    lo, hi = col([r[0] for r in ranges]), col([r[1] for r in ranges])
    qmin, qmax = int_range(qs[0].fmt, qs[0].symmetric)
    scale, zp = col([q.scale for q in qs]), col([float(q.zero_point) for q in qs])
    x = values[None, :]
    inl = (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale
    res = x - torch.minimum(torch.maximum(x, lo), hi)
    os = col(outlier_scales)
    safe = torch.where(os > 0, os, torch.ones_like(os))
    out = torch.clamp(torch.round(res / safe), -OUTLIER_QMAX, OUTLIER_QMAX) * os
    return ((inl + out - x).pow(2) * weights[None, :]).sum(dim=1) / weights.sum()


def with_outlier_split(stats: ActivationStats, single: ActQParams, min_gain_db: float) -> ActQParams:
    """``single``, or an inlier quantizer with an outlier quantizer when that gains more than ``min_gain_db``.

    Candidates move a share of the values (``OUTLIER_SHARES``, per side for asymmetric quantizers, of ``|x|``
    for symmetric ones) beyond the inlier range: the range is the weighted quantile of the calibration sample
    (uniform sample plus exact tails, :meth:`ActivationStats.weighted_sample`), the outlier scale covers the
    exact extremes. A candidate whose outlier share exceeds ``MAX_OUTLIER_SHARE`` (many values tied at the
    quantile, e.g. a timestep embedding repeated over the batch) is not sparse and is not taken. Each candidate's MSE on the weighted sample is compared with ``single``'s; the gain in
    dB is the SQNR gain (same signal). Only int8 quantizers are split.
    """
    values, weights = stats.weighted_sample()
    if single.fmt != "int8" or values.numel() == 0 or not stats.is_finite():
        return single
    base = float(((fake_quantize(values, single.fmt, torch.tensor(single.scale), single.zero_point, single.symmetric) - values).pow(2) * weights).sum() / weights.sum())
    shares = torch.tensor(OUTLIER_SHARES)
    if single.symmetric:
        amax = _weighted_quantile(values.abs(), weights, 1 - shares)
        pairs = [(-float(a), float(a)) for a in amax]
    else:
        los, his = _weighted_quantile(values, weights, shares), _weighted_quantile(values, weights, 1 - shares)
        pairs = [(float(lo), float(hi)) for lo in los for hi in his]
    cands = []
    for lo, hi in pairs:
        q = qparams_from_range(single.fmt, single.symmetric, min(lo, 0.0), max(hi, 0.0), single.method)
        glo, ghi = _grid_range(q)
        reach = max(stats.amax - ghi, glo - stats.amin, 0.0)
        share = float((weights * ((values < glo) | (values > ghi))).sum() / weights.sum())
        if reach > 0.0 and share <= MAX_OUTLIER_SHARE:  # else nothing lies beyond the inlier range, or too much
            cands.append((q, reach / OUTLIER_QMAX, share))
    if not cands:
        return dataclasses.replace(single, outlier_gain_db=0.0)
    mses = split_mse(values, weights, [c[0] for c in cands], [c[1] for c in cands])
    i = int(torch.argmin(mses))
    q, oscale, share = cands[i]
    mse = float(mses[i])
    gain = 10 * math.log10(max(base, 1e-30) / max(mse, 1e-30))
    if gain <= min_gain_db:
        return dataclasses.replace(single, outlier_gain_db=gain)
    return dataclasses.replace(q, outlier=OutlierQParams(oscale, share, gain), outlier_gain_db=gain)


def _choose(stats: ActivationStats, spec: ActSpec) -> ActQParams:
    fmt, sym, method = spec.fmt.value, spec.symmetric, spec.range_method
    if method is RangeMethod.MINMAX or stats.values.numel() == 0:
        return qparams_from_range(fmt, sym, stats.amin, stats.amax, RangeMethod.MINMAX.value)
    v = stats.values
    if method is RangeMethod.PERCENTILE:
        q = spec.percentile / 100.0
        if sym:
            return qparams_from_range(fmt, sym, 0.0, float(torch.quantile(v.abs(), q)), method.value)
        return qparams_from_range(fmt, sym, float(torch.quantile(v, 1 - q)), float(torch.quantile(v, q)), method.value)
    lo0, hi0 = min(stats.amin, 0.0), max(stats.amax, 0.0)
    if sym:
        ratios = torch.linspace(MIN_RATIO, 1.0, MSE_GRID_SYMMETRIC)
        amax = max(-lo0, hi0, 1e-8)
        cands = [qparams_from_range(fmt, sym, 0.0, amax * float(r), method.value) for r in ratios]
    else:
        ratios = torch.linspace(MIN_RATIO, 1.0, MSE_GRID_ASYMMETRIC)
        cands = [qparams_from_range(fmt, sym, lo0 * float(a), hi0 * float(b), method.value) for a in ratios for b in ratios]
    scales = torch.tensor([c.scale for c in cands])
    zps = torch.tensor([float(c.zero_point) for c in cands])
    values, weights = stats.weighted_sample()
    best = int(torch.argmin(_mse(values, weights, fmt, sym, scales, zps)))
    return cands[best]
