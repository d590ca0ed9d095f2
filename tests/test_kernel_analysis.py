"""The memoized Triton mutation analysis: one analysis per (kernel, argument kinds and values), PyTorch's own
function back after the block, symbolic arguments analysed every time."""

import torch
from torch._higher_order_ops import triton_kernel_wrap as wrap

from qcompile.kernel_analysis import ANALYSES, memoized_kernel_analysis


def test_repeated_launches_are_analysed_once_and_the_function_is_restored(monkeypatch):
    name = next(n for n in ANALYSES if hasattr(wrap, n))
    calls = []

    def fake_analysis(kernel, kwargs, tma):
        calls.append(kernel)
        return ["out_ptr"]

    monkeypatch.setattr(wrap, name, fake_analysis)
    kernel_a, kernel_b = object(), object()
    x, y = torch.empty(4), torch.empty(8)
    with memoized_kernel_analysis():
        fn = getattr(wrap, name)
        assert fn is not fake_analysis
        first = fn(kernel_a, {"x_ptr": x, "out_ptr": y, "M": 4, "BLOCK": 16}, {})
        first.append("mutated by a caller")
        assert fn(kernel_a, {"x_ptr": torch.empty(2), "out_ptr": y, "M": 4, "BLOCK": 16}, {}) == ["out_ptr"]  # same kinds
        fn(kernel_a, {"x_ptr": x, "out_ptr": y, "M": 5, "BLOCK": 16}, {})  # another value: analysed
        fn(kernel_a, {"x_ptr": x.half(), "out_ptr": y, "M": 4, "BLOCK": 16}, {})  # another dtype: analysed
        fn(kernel_b, {"x_ptr": x, "out_ptr": y, "M": 4, "BLOCK": 16}, {})  # another kernel: analysed
        fn(kernel_b, {"x_ptr": x, "out_ptr": y, "M": [4], "BLOCK": 16}, {})  # unhashable: analysed every time
        fn(kernel_b, {"x_ptr": x, "out_ptr": y, "M": [4], "BLOCK": 16}, {})
    assert calls == [kernel_a, kernel_a, kernel_a, kernel_b, kernel_b, kernel_b]
    assert getattr(wrap, name) is fake_analysis
