"""The im2col conv's column order: columns times the reordered weight is the convolution (any kernel, stride,
padding, dilation, split slices), and the weight reorder is exactly invertible."""

import pytest
import torch
import torch.nn.functional as F

from qcompile.lowering import conv_im2col

CASES = [  # (C, N, kernel, stride, padding, dilation, splits)
    (32, 24, (3, 3), (1, 1), (1, 1), (1, 1), None),
    (32, 24, (3, 3), (2, 2), (1, 1), (1, 1), (0, 16, 32)),
    (48, 8, (1, 3), (1, 2), (0, 1), (1, 1), (0, 16, 32, 48)),
    (16, 8, (3, 3), (1, 1), (2, 2), (2, 2), None),
    (32, 16, (2, 2), (2, 2), (0, 0), (1, 1), (0, 8, 32)),
]


@pytest.mark.parametrize("c,n,kernel,stride,padding,dilation,splits", CASES)
def test_columns_times_reordered_weight_is_the_convolution(c, n, kernel, stride, padding, dilation, splits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, 9, 11, generator=g, dtype=torch.float64)
    w = torch.randn(n, c, *kernel, generator=g, dtype=torch.float64)
    shape = tuple(w.shape)
    cols = conv_im2col.im2col(x, kernel, stride, padding, dilation, splits)
    wc = conv_im2col.columns_weight(w.reshape(n, -1), shape, splits)
    ref = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
    b, _, oh, ow = ref.shape
    assert cols.shape == conv_im2col.column_shape(x.shape, shape, stride, padding, dilation)
    out = (cols @ wc.t()).view(b, oh, ow, n).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    if splits is not None:  # slice s occupies the K range [p_s * KH * KW, p_s+1 * KH * KW) of both
        taps = kernel[0] * kernel[1]
        for a, b_ in zip(splits[:-1], splits[1:]):
            part = F.conv2d(x[:, a:b_], w[:, a:b_], stride=stride, padding=padding, dilation=dilation)
            got = (cols[:, a * taps : b_ * taps] @ wc[:, a * taps : b_ * taps].t()).view(b, oh, ow, n).permute(0, 3, 1, 2)
            torch.testing.assert_close(got, part, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("splits", [None, (0, 16, 48), (0, 8, 40, 48)])
def test_weight_reorder_round_trips_exactly(splits):
    shape = (12, 48, 3, 3)
    data = torch.randint(0, 256, (12, 48 * 9), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cols = conv_im2col.columns_weight(data, shape, splits)
    assert cols.is_contiguous() and cols.dtype == torch.uint8
    assert not torch.equal(cols, data)
    assert torch.equal(conv_im2col.plan_weight(cols, shape, splits), data)
