"""The ahead-of-time compile check's case list binds every argument of every kernel it compiles.

(Compiling for sm_90 is left to ``python -m qcompile.lowering.kernels.aot_check``: minutes on a CPU. This catches the
case list falling behind a kernel's signature, e.g. a new constexpr, which made every conv case fail to compile.)"""

import inspect

import pytest

from qcompile.lowering.kernels import aot_check

ALL = set(aot_check.GROUPS)


def _arguments(kernel) -> tuple[set[str], set[str]]:
    """(constexpr arguments without a default, other arguments) of a Triton kernel (JIT or interpreted)."""
    params = inspect.signature(getattr(kernel, "fn", kernel)).parameters.values()
    constexpr = {p.name for p in params if str(p.annotation).endswith("constexpr") and p.default is inspect.Parameter.empty}
    runtime = {p.name for p in params if not str(p.annotation).endswith("constexpr")}
    return constexpr, runtime


def test_every_case_binds_every_kernel_argument():
    names = []
    for name, kernel, sig, flags, configs, aligned in aot_check.cases(ALL):
        constexpr, runtime = _arguments(kernel)
        assert constexpr, f"{name}: no constexpr arguments found (kernel signature not read)"
        for cfg in configs:
            bound = set(flags) | set(cfg.kwargs)
            assert constexpr <= bound, f"{name} {cfg}: constexprs without a value: {sorted(constexpr - bound)}"
            assert runtime - bound <= set(sig), f"{name}: arguments without a type: {sorted(runtime - bound - set(sig))}"
        assert set(aligned) <= runtime | set(flags), f"{name}: aligned names that are not arguments: {sorted(set(aligned) - runtime)}"
        names.append(name)
    assert {"conv fp8 direct", "conv fp8 direct split (2 slices)", "conv fp8 direct, split-K 3"} <= set(names)


def test_every_group_has_cases_and_unknown_groups_are_refused(capsys):
    with_cases = ALL if aot_check.fp8_tma.HAS_TMA else ALL - {"tma"}  # (the TMA kernels need a Triton with tensor descriptors)
    assert all(next(aot_check.cases({g}), None) is not None for g in with_cases)
    with pytest.raises(SystemExit) as e:
        aot_check.main(["fp8", "--help-me"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        aot_check.main(["fp8", "nope"])
    assert "unknown kernel group(s) nope" in capsys.readouterr().err


def test_attention_kernel_compiles_with_the_argument_types_inductor_gives_it():
    """The lowering's attention cases (fp8 q / k / v, V stored by keys) compile for sm_90 with an fp64 ``sm_scale`` and
    with every scalar a constexpr (:func:`aot_check.inductor_variants`). On 2026-12-02 the kernel compiled in every direct
    launch and failed under Inductor on the GPU: ``tl.multiple_of`` on a constexpr stride, and an fp64 loop-carried
    accumulator. Compiling needs a process without the interpreter: a subprocess."""
    import os
    import subprocess
    import sys

    code = (
        "from qcompile.lowering.kernels import aot_check\n"
        "for name, kernel, sig, flags, configs, aligned in aot_check.cases({'attention'}):\n"
        "    if 'V^T' in name:\n"
        "        for label, s, c in aot_check.inductor_variants(kernel, sig, flags):\n"
        "            aot_check.compile_one(kernel, s, c, configs[0], [n for n in aligned if n not in c])\n"
        "            print(name, label, 'ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(" ok") == 14, r.stdout  # 7 V^T cases (one with fp8 output, three more its softmax modes) x 2 typings
