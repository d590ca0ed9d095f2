"""Tiny readers for the data in ``<shared>/data``: the MNIST test set in the official IDX format
(``t10k-*-ubyte.gz``) and CIFAR-10 as JPEG bytes in an npz (``cifar10-{train,test}-jpeg.npz``)."""

from __future__ import annotations

import gzip
import io
import os
import struct

import numpy as np
import torch

from . import require_shared

__all__ = ["read_idx", "load_mnist_test", "load_cifar10"]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=_IDX_DTYPES[dtype_code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape} = {int(np.prod(shape))} items, found {arr.size}")
    return arr.reshape(shape)


def load_mnist_test(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` (default all 10,000) MNIST test images and labels.

    Returns ``(images, labels)``: images float32 (n, 1, 28, 28) in [0, 1] (background 0, stroke 1),
    labels int64 (n,).
    """
    images = read_idx(require_shared("data/t10k-images-idx3-ubyte.gz"))
    labels = read_idx(require_shared("data/t10k-labels-idx1-ubyte.gz"))
    if n is not None:
        images, labels = images[:n], labels[:n]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_cifar10(split: str = "test", n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` (default all) CIFAR-10 images and labels of ``split`` ("train" or "test").

    Returns ``(images, labels)``: images float32 (n, 3, 32, 32) in [0, 1], labels int64 (n,) with the
    standard class order (airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck).
    """
    from PIL import Image

    if split not in ("train", "test"):
        raise ValueError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    d = np.load(require_shared(f"data/cifar10-{split}-jpeg.npz"))
    jpeg, off, labels = d["jpeg"], d["offsets"], d["labels"]
    count = len(off) - 1 if n is None else min(n, len(off) - 1)
    images = np.stack([np.asarray(Image.open(io.BytesIO(jpeg[off[i] : off[i + 1]].tobytes())).convert("RGB")) for i in range(count)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    return x, torch.from_numpy(labels[:count].astype(np.int64))
