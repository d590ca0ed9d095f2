"""fp8 attention heads written by the q / k / v projection's GEMM: the layout, its views, and the reference.

Without this, a quantized attention call reads its q / k / v projections' float output and quantizes it in a
separate pass (:func:`.kernels.fp8_attention.quantize_heads`: q / k padded with zero columns to a power of two, V
stored with its keys contiguous), ~43 us per DiT-XL/2 layer on an H200 (docs/kernels.md, "fp8 attention v2"). With
``passes.attention_heads`` the projection's GEMM quantizes its output per column with the attention's static q / k /
v scales and stores it in that layout itself (``qdiff::fp8_linear_heads``); the bf16 projection output is never
written.

The GEMM's output ``(M = B * S, N)`` goes to one flat float8_e4m3fn buffer (:class:`HeadsLayout`):

- columns ``[0, n_rm)`` (q and / or k heads of ``head_dim``): ``(M, n_rm / head_dim, head_width)``, each head padded
  with zeros from ``head_dim`` to ``head_width`` (:func:`.kernels.fp8_attention.qk_width`); a section of heads viewed
  ``(B, H, S, head_width)`` has the row stride ``n_rm / head_dim * head_width``;
- columns ``[n_rm, N)`` (V heads): after that, ``(B, n_vt, seq_pad)``: per batch the transposed output, keys
  contiguous, rows padded to 16 bytes (never read: the kernel masks keys past ``S``).

So a projection's sections must come q / k first and V last (fused siblings keep the graph's order: q, k, v).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import quantize_fp8

FP8 = torch.float8_e4m3fn
ROW_BYTES = 16  # rows of the V region (keys) are padded to this many bytes: 16-byte loads in the attention kernel
# the GEMM kernels' heads constexprs for a plain (M, N) output (HeadsLayout.kernel_args and HEADS=True: heads)
NO_HEADS = {"HEADS": False, "N_RM": 0, "SEQ": 1, "SEQ_PAD": 1, "HEAD_D": 1, "HEAD_W": 1}


@dataclass(frozen=True)
class HeadsLayout:
    """Where each output column of a ``(batch * seq, n_rm + n_vt)`` projection goes (module docstring)."""

    batch: int
    seq: int
    n_rm: int
    n_vt: int
    head_dim: int
    head_width: int

    def __post_init__(self) -> None:
        if min(self.batch, self.seq, self.head_dim) < 1 or min(self.n_rm, self.n_vt) < 0 or self.n_rm + self.n_vt == 0:
            raise ValueError(f"heads layout needs positive batch, seq, head dim and some columns: {self}")
        if self.n_rm % self.head_dim or self.n_vt % self.head_dim:
            raise ValueError(f"heads layout: column counts {self.n_rm} / {self.n_vt} are not whole heads of {self.head_dim}")
        if not self.head_dim <= self.head_width <= 2 * self.head_dim:
            raise ValueError(f"heads layout: q / k width {self.head_width} must lie in [head dim, 2 * head dim] ({self.head_dim})")
        if (self.n_rm // self.head_dim * self.head_width) % ROW_BYTES:
            raise ValueError(f"heads layout: q / k rows of {self.n_rm // self.head_dim} x {self.head_width} bytes are not a multiple of {ROW_BYTES}")

    @property
    def rows(self) -> int:
        return self.batch * self.seq

    @property
    def columns(self) -> int:
        return self.n_rm + self.n_vt

    @property
    def rm_heads(self) -> int:
        return self.n_rm // self.head_dim

    @property
    def seq_pad(self) -> int:
        return self.seq + (-self.seq % ROW_BYTES)

    @property
    def vt_offset(self) -> int:
        return self.rows * self.rm_heads * self.head_width

    @property
    def numel(self) -> int:
        return self.vt_offset + self.batch * self.n_vt * self.seq_pad

    def fields(self) -> tuple[int, ...]:
        """``(batch, seq, n_rm, n_vt, head_dim, head_width)``: ``HeadsLayout(*fields)`` is this layout."""
        return (self.batch, self.seq, self.n_rm, self.n_vt, self.head_dim, self.head_width)

    def kernel_args(self) -> dict[str, int]:
        """The GEMM kernels' constexprs for this layout (:func:`.kernels._common.store_heads`)."""
        return {"N_RM": self.n_rm, "SEQ": self.seq, "SEQ_PAD": self.seq_pad, "HEAD_D": self.head_dim, "HEAD_W": self.head_width}

    def view(self, buf: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Columns ``[start, stop)`` of the projection (whole heads, all q / k or all V) as ``(B, H, S, D)`` heads of
        the flat buffer ``buf``: q / k ``D = head_width`` (zero-padded), V stored (B, H, D, S_pad)."""
        d = self.head_dim
        if not (0 <= start < stop <= self.columns) or start % d or stop % d or (start < self.n_rm < stop):
            raise ValueError(f"columns [{start}, {stop}) are not whole heads of one region of {self}")
        if stop <= self.n_rm:
            rm = buf[: self.vt_offset].view(self.batch, self.seq, self.rm_heads, self.head_width)
            return rm[:, :, start // d : stop // d].transpose(1, 2)
        vt = buf[self.vt_offset :].view(self.batch, self.n_vt, self.seq_pad)
        return vt[:, start - self.n_rm : stop - self.n_rm, : self.seq].unflatten(1, (-1, d)).transpose(-1, -2)


def reference_heads(y: torch.Tensor, out_scale: torch.Tensor, layout: HeadsLayout) -> torch.Tensor:
    """The flat buffer of :class:`HeadsLayout` for the float projection output ``y`` (M, N): each column quantized
    with its static scale ``out_scale[n]`` (:func:`.formats.quantize_fp8`), zeros in the padding."""
    if tuple(y.shape) != (layout.rows, layout.columns) or out_scale.shape != (layout.columns,):
        raise ValueError(f"heads of {tuple(y.shape)} with {tuple(out_scale.shape)} scales do not match {layout}")
    codes = quantize_fp8(y, out_scale.float())
    buf = torch.zeros(layout.numel, dtype=FP8, device=y.device)
    d, n_rm = layout.head_dim, layout.n_rm
    rm = buf[: layout.vt_offset].view(layout.rows, layout.rm_heads, layout.head_width)
    rm[:, :, :d] = codes[:, :n_rm].reshape(layout.rows, layout.rm_heads, d)
    vt = buf[layout.vt_offset :].view(layout.batch, layout.n_vt, layout.seq_pad)
    vt[:, :, : layout.seq] = codes[:, n_rm:].reshape(layout.batch, layout.seq, layout.n_vt).transpose(1, 2)
    return buf


def exact_case(M: int, K: int, N: int, seed: int = 0, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Inputs of an fp8 projection whose every step is exact (the heads epilogue's checks: outputs equal byte for byte):
    ``[x8, w8, w_scale, bias, a_scale, out_scale, y]`` with integer codes in [-3, 3] (fp32, cast to fp8 by the caller),
    power-of-two scales, and the fp32 output ``y = (x8 @ w8^T) * a_scale * w_scale + bias`` (exact in fp32)."""
    g = torch.Generator().manual_seed(seed)
    x8 = torch.randint(-3, 4, (M, K), generator=g).float()
    w8 = torch.randint(-3, 4, (N, K), generator=g).float()
    ws = 2.0 ** torch.randint(-3, 1, (N,), generator=g).float()
    bias = torch.randint(-4, 5, (N,), generator=g).float() / 4
    a_scale = torch.tensor(0.5)
    out_scale = 2.0 ** torch.randint(-1, 3, (N,), generator=g).float()
    y = (x8 @ w8.T) * a_scale * ws + bias  # exact
    return [t.to(device) for t in (x8, w8, ws, bias, a_scale, out_scale, y)]


def heads_view(buf: torch.Tensor, heads: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
    """:meth:`HeadsLayout.view` of ``HeadsLayout(*heads)``: the call a rewritten graph makes for each of q / k / v
    (graphs carry the layout as its :meth:`HeadsLayout.fields`, plain ints)."""
    return HeadsLayout(*heads).view(buf, start, stop)
