"""The qdiff post-grad pass's cache identity (``uuid``): plan, lowering and the kernels' environment switches."""

import pytest

from qcompile.inductor_pass import KERNEL_SWITCHES, QdiffKernelPass


def test_uuid_changes_with_plan_lowering_and_kernel_switches(monkeypatch):
    for k in KERNEL_SWITCHES:
        monkeypatch.delenv(k, raising=False)
    base = QdiffKernelPass("digest-a", "triton").uuid()
    assert base == QdiffKernelPass("digest-a", "triton").uuid()
    assert base != QdiffKernelPass("digest-b", "triton").uuid()
    assert base != QdiffKernelPass("digest-a", "reference").uuid()
    seen = {base}
    for k in KERNEL_SWITCHES:  # read by the kernels' wrappers at trace time: the traced graph does not show them
        monkeypatch.setenv(k, "0")
        seen.add(QdiffKernelPass("digest-a", "triton").uuid())
    assert len(seen) == 1 + len(KERNEL_SWITCHES)


@pytest.mark.parametrize("switch", KERNEL_SWITCHES)
def test_kernel_switches_exist_in_the_lowering(switch):
    import pathlib

    import qcompile.lowering.kernels as kernels

    sources = "".join(p.read_text() for p in pathlib.Path(kernels.__file__).parents[1].rglob("*.py"))  # the lowering package
    assert f'"{switch}"' in sources
