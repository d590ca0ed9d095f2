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


def _run_without_interpreter(code: str) -> str:
    """Run ``code`` in a Python subprocess without ``TRITON_INTERPRET`` (compiling for sm_90 needs the real compiler);
    its stdout."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_attention_kernel_compiles_with_the_argument_types_inductor_gives_it():
    """The lowering's attention cases (fp8 q / k / v, V stored by keys) compile for sm_90 with an fp64 ``sm_scale`` and
    with every scalar a constexpr (:func:`aot_check.inductor_variants`). On 2026-12-02 the kernel compiled in every direct
    launch and failed under Inductor on the GPU: ``tl.multiple_of`` on a constexpr stride, and an fp64 loop-carried
    accumulator. Compiling needs a process without the interpreter: a subprocess."""
    out = _run_without_interpreter(
        "from qcompile.lowering.kernels import aot_check\n"
        "for name, kernel, sig, flags, configs, aligned in aot_check.cases({'attention'}):\n"
        "    if 'V^T' in name:\n"
        "        for label, s, c in aot_check.inductor_variants(kernel, sig, flags):\n"
        "            aot_check.compile_one(kernel, s, c, configs[0], [n for n in aligned if n not in c])\n"
        "            print(name, label, 'ok')\n"
    )
    assert out.count(" ok") == 16, out  # 8 V^T cases (3 plain, the lowering's in 4 softmax modes, 1 more) x 2 typings


def test_loop_instructions_counts_the_longest_backward_branch_span():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FFMA R2, R3, R4, R5 ;
        /*0020*/              @!P0 BRA 0x0010 ;
        /*0030*/                   MUFU.EX2 R6, R7 ;
        /*0040*/                   FMUL R8, R9, R10 ;
        /*0050*/               @P1 BRA 0x0030 ;
        /*0060*/                   BRA 0x0070 ;
        /*0070*/                   EXIT ;
    """
    assert aot_check.loop_instructions(sass) == 3  # 0x0030-0x0050 (the longer of the two loops), a forward branch is no loop
    assert aot_check.loop_instructions("/*0000*/ EXIT ;") == 0


def test_attention_ones_row_in_storage_shortens_the_key_loop():
    """sm_90 SASS of the lowering's attention call (D = 72, fp8 in, V^T, fp8 out) at 128 x 64 (3 stages, 8 warps): the
    row sums from V's ones column (ex2-lv) read from storage take fewer instructions a key tile than set in registers,
    and both fewer than ex2's per-score adds (2026-12-04, triton 3.6: 304 / 325 / 341). The kernel is bound by
    instruction issue, so this count is its time's proxy (docs/kernels.md). Compiled in a subprocess (no interpreter)."""
    out = _run_without_interpreter(
        "import importlib\n"
        "from qcompile.lowering.kernels import aot_check\n"
        "fa = importlib.import_module('qcompile.lowering.kernels.fp8_attention')  # (the package re-exports the function)\n"
        "_, kernel, sig, flags, _, aligned = next(c for c in aot_check.cases({'attention'}) if 'fp8 out' in c[0])\n"
        "for mode, ones in (('ex2-lv', True), ('ex2-lv', False), ('ex2', False)):\n"
        "    f = dict(flags, SOFTMAX=fa.SOFTMAX_MODES.index(mode), V_ONES=ones)\n"
        "    print(aot_check.compile_one(kernel, sig, f, fa._cfg(128, 64, 3, 8), aligned).loop_instructions)\n"
    )
    from_storage, in_registers, ex2 = map(int, out.split())
    assert 0 < from_storage < in_registers < ex2, out
