"""qdiff bench: row measurement on CPU with a tiny model, ratios, tables, merging, subprocess limits."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qcompile import bench


class TinyDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.proj = torch.nn.Linear(16, 3)

    def forward(self, sample, timestep):
        h = self.conv(sample)
        h = torch.nn.functional.silu(h + timestep.to(h.dtype).view(-1, 1, 1, 1) / 1000)
        return self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _inputs(device, dtype, t):
    g = torch.Generator().manual_seed(t)
    return {"sample": torch.randn(2, 3, 8, 8, generator=g).to(device, dtype), "timestep": torch.full((2,), t, device=device)}


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(bench.MODELS, "tiny", bench.BenchModel("tiny", "tiny conv + linear", TinyDenoiser, _inputs))
    return "tiny"


@pytest.mark.parametrize("variant", ["bf16-eager", "qdiff-w8a8-int8", "qdiff-w4a16", "qdiff-w8a8-fp8-cudagraphs"])
def test_measure_row_on_cpu(tiny, variant):
    row = bench.measure(tiny, variant, "cpu", budget_s=0.05)
    assert row.status == "ok" and row.ms > 0 and row.repeats >= 3
    assert row.date and row.device.startswith("cpu") and row.torch == torch.__version__
    float_bytes = sum(p.numel() for p in TinyDenoiser().parameters()) * 2  # bf16
    if variant == "bf16-eager":
        assert row.weight_gb * 2**30 == float_bytes == row.extra["resident_weight_gb"] * 2**30 and row.compile_s is None
    else:
        assert row.quantized_ops == "2/2 ops" and row.calibration_s > 0 and row.compile_s > 0
        assert row.weight_gb * 2**30 < float_bytes  # int8 / int4 storage, not fp32 fake weights
        assert row.extra["qdiff_kernels"] == {}  # CPU: no Inductor post-grad pass; the plan itself is not kept in the row
        weights = TinyDenoiser()
        released = (weights.conv.weight.numel() + weights.proj.weight.numel()) * 2
        assert row.extra["released_float_gb"] * 2**30 == released  # compiled with release_float_weights
        assert row.weight_gb <= row.extra["resident_weight_gb"] < float_bytes / 2**30  # + activation scales, bias corrections
        # the compiled row's prediction against the bf16 model's before quantizing: int8 / int4 rounding, not garbage
        assert 10 < row.extra["sqnr_vs_bf16_eager_db"] < 60
        phases = row.extra["compile_phases_s"]  # CPU: no Inductor; the first run is not timed apart in-process
        assert set(phases) == {"passes", "dynamo_and_rest"} and min(phases.values()) >= 0
        assert sum(phases.values()) == pytest.approx(row.compile_s, abs=0.1)
        json.dumps(row.extra)


def test_inductor_rows_record_torch_compile_phases(tiny):
    """torch's own compile timers of the row's first call (Inductor's lowering, code generation, waiting for kernel
    compiles ...); Inductor's compile, a phase of the main thread, within the measured compile time (timers of work in
    compile threads sum over the threads and may exceed it). Bench rows compile with a fresh cache; here the FX graph
    cache is off for the call so that Inductor compiles again."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False):
        row = bench.measure(tiny, "bf16-inductor", "cpu", budget_s=0.05)
    phases = row.extra["torch_compile_phases_s"]
    assert 0 < phases["compile_fx_inner"] <= row.compile_s + 0.05


def test_measure_row_in_a_multi_row_run_on_cpu(tiny, tmp_path, monkeypatch):
    """In a multi-row run (the rows folder set) the qdiff backend is compiled through the first-run wrapper; the row
    measures the same as in-process (its first run took the host lock: no other rows here to pause)."""
    monkeypatch.setenv(bench.ROWS_ENV, str(tmp_path))
    wrapped, real = [], bench._exclusive_first_run
    monkeypatch.setattr(bench, "_exclusive_first_run", lambda compiled, rows_dir, first: wrapped.append(rows_dir) or real(compiled, rows_dir, first))
    row = bench.measure(tiny, "qdiff-w8a8-int8", "cpu", budget_s=0.05)
    assert row.status == "ok" and row.ms > 0 and row.quantized_ops == "2/2 ops" and row.compile_s > 0
    assert wrapped == [str(tmp_path)]  # one graph, compiled by the qdiff backend inside the wrapper
    assert len(row.extra["first_calls_s"]) == 1 and 0 < row.extra["first_calls_s"][0] <= row.compile_s
    assert row.extra["compile_phases_s"]["first_runs"] == row.extra["first_calls_s"][0]
    assert row.extra["rows_paused_while_timing"] == 0


def test_rows_far_from_the_bf16_model_are_marked_suspect():
    rows = [bench.Row("m", v, ms=1.0, extra={"sqnr_vs_bf16_eager_db": db})
            for v, db in (("fine", 24.5), ("wrong", 3.2), ("nan", float("nan")))] + [bench.Row("m", "eager", ms=1.0)]
    status = {line.split(" | ")[1]: line.rsplit(" | ", 1)[1] for line in bench.markdown_table(rows).splitlines()[2:]}
    assert status == {"fine": "ok |", "wrong": "ok (output suspect: 3.2 dB vs bf16 eager) |",
                      "nan": "ok (output suspect: nan dB vs bf16 eager) |", "eager": "ok |"}


def test_output_tensor_finds_the_prediction():
    from types import SimpleNamespace as NS

    t = torch.ones(2)
    assert all(bench.output_tensor(o) is t for o in (t, (t, None), [t], NS(sample=t), (NS(sample=t),)))
    with pytest.raises(TypeError, match="prediction tensor in a dict"):
        bench.output_tensor({"x": t})


def test_kernel_counts_sum_over_compiled_graphs():
    from types import SimpleNamespace as NS

    plan = NS(compiled=[NS(kernel_pass=NS(kernels={"fp8_tma.fp8_linear_tma_kernel": 3, "qdiff::int8_linear": 1})),
                        NS(kernel_pass=None), NS(kernel_pass=NS(kernels={"fp8_tma.fp8_linear_tma_kernel": 2}))])
    assert bench.qdiff_kernel_counts(plan) == {"fp8_tma.fp8_linear_tma_kernel": 5, "qdiff::int8_linear": 1}


def test_ratios_table_and_merge(tmp_path):
    rows = [bench.Row("m", "bf16-inductor", ms=10.0), bench.Row("m", "qdiff-w8a8-fp8", ms=8.0), bench.Row("m", "torchao-fp8-dynamic", status="timeout", error="row time limit")]
    bench.add_ratios(rows)
    assert [r.ratio_vs_bf16_inductor for r in rows] == [1.0, 1.25, None]
    graphs = [bench.Row("m", "bf16-inductor-cudagraphs", ms=4.0), bench.Row("m", "qdiff-w8a8-fp8-cudagraphs", ms=5.0),
              bench.Row("n", "qdiff-w8a8-fp8-cudagraphs", ms=5.0), bench.Row("n", "bf16-inductor", ms=10.0)]
    bench.add_ratios(rows + graphs)  # CUDA-graph rows against bf16 Inductor with CUDA graphs, none without one
    assert [r.ratio_vs_bf16_inductor for r in graphs] == [1.0, 0.8, None, 1.0]
    bench.write_results(rows, tmp_path, "qdiff bench --models m", merge=False)
    (tmp_path / "benchmarks.md").write_text("# Benchmarks\n\nintro\n\n" + (tmp_path / "benchmarks.md").read_text().split("\n", 2)[2] + "\ntail\n")
    not_started = bench.Row("m", "qdiff-w8a8-fp8", status="skipped", error="not started")  # keeps the measured row
    bench.write_results([bench.Row("m", "bf16-inductor", ms=5.0), not_started], tmp_path, "qdiff bench --variants bf16-inductor", merge=True)
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    assert {(d["variant"], d["ms"]) for d in data} == {("bf16-inductor", 5.0), ("qdiff-w8a8-fp8", 8.0), ("torchao-fp8-dynamic", None)}
    # over its time limit or failed: the measured row stays and says what the later attempt did; a row never measured
    # takes the error
    late = bench.Row("m", "qdiff-w8a8-fp8", status="timeout", error="total time", date="2026-12-01")
    crashed = bench.Row("m", "bf16-inductor", status="error", error="killed by SIGSEGV", date="2026-12-02")
    bench.write_results([late, crashed, bench.Row("m", "new-variant", status="error", error="boom")], tmp_path, "qdiff bench", merge=True)
    data = {d["variant"]: d for d in json.loads((tmp_path / "benchmarks.json").read_text())}
    assert data["qdiff-w8a8-fp8"]["ms"] == 8.0 and data["qdiff-w8a8-fp8"]["extra"]["later_attempt"]["status"] == "timeout"
    assert data["bf16-inductor"]["ms"] == 5.0 and data["bf16-inductor"]["extra"]["later_attempt"]["error"] == "killed by SIGSEGV"
    assert data["new-variant"]["status"] == "error"
    assert "a later attempt on 2026-12-02: error: killed by SIGSEGV" in (tmp_path / "benchmarks.md").read_text()
    bench.write_results([bench.Row("m", "bf16-inductor", ms=5.0)], tmp_path, "qdiff bench --variants bf16-inductor", merge=True)
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    # the qdiff row keeps the ratio against the bf16 row of its own run (10 ms), not the later run's 5 ms
    assert {d["variant"]: d["ratio_vs_bf16_inductor"] for d in data}["qdiff-w8a8-fp8"] == pytest.approx(10.0 / 8.0)
    bench.write_results([bench.Row("m", "qdiff-w4a16", ms=4.0)], tmp_path, "qdiff bench --variants qdiff-w4a16", merge=True)
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    w4 = next(d for d in data if d["variant"] == "qdiff-w4a16")
    assert w4["ratio_vs_bf16_inductor"] == pytest.approx(5.0 / 4.0)  # no bf16 row in its run: the table's
    assert "bf16_inductor_ms_same_run" not in w4["extra"]
    bench.write_results([bench.Row("m", "bf16-inductor", ms=2.0)], tmp_path, "qdiff bench --variants bf16-inductor", merge=True)
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    w4 = next(d for d in data if d["variant"] == "qdiff-w4a16")  # measured against the table's 5 ms: a merge keeps that
    assert w4["ratio_vs_bf16_inductor"] == pytest.approx(5.0 / 4.0) and w4["extra"]["bf16_inductor_ms_of_the_table"] == pytest.approx(5.0)
    for key in ("model", "variant", "ms", "ratio_vs_bf16_inductor", "compile_s", "peak_mem_gb", "device", "date"):
        assert all(key in d for d in data)
    md = (tmp_path / "benchmarks.md").read_text()
    assert md.count(bench.BEGIN) == 1 and "intro" in md and "tail" in md and "timeout: row time limit" in md


def test_subprocess_row_reports_errors_and_time_limits():
    err = bench._run_row_subprocess("dit-xl-2-512", "no-such-variant", "cpu", None, timeout_s=120, budget_s=0.1)
    assert err.status == "error" and "no-such-variant" in err.error
    slow = bench._run_row_subprocess("dit-xl-2-512", "bf16-eager", "cpu", None, timeout_s=0.5, budget_s=0.1)
    assert slow.status == "timeout" and "0.5 s" in slow.error and slow.ms is None


def test_a_row_that_raises_reports_its_exception_and_where():
    err = bench._run_row_subprocess("dit-xl-2-512", "no-such-variant", "cpu", None, timeout_s=120, budget_s=0.1)
    assert err.error.startswith(("KeyError", "ValueError", "RuntimeError")) and "bench.py:" in err.error, err.error


def test_a_row_killed_by_a_signal_or_failing_after_warnings_says_why():
    assert "SIGKILL" in bench._row_failure(-9, "UserWarning: x\n", "") and "out-of-memory" in bench._row_failure(-9, "", "")
    stderr = "Traceback (most recent call last):\n  File a\n  File b\n  File c\nValueError: the cause\n\nUserWarning: later noise\n  warn_once("
    why = bench._row_failure(1, stderr, "")
    assert why.startswith("Traceback") and "ValueError: the cause" in why


def test_rows_side_by_side_share_the_compile_workers():
    assert bench.compile_threads_per_row(6, cpus=16) == 2 and bench.compile_threads_per_row(1, cpus=16) == 16
    assert bench.compile_threads_per_row(4, cpus=16) == 4 and bench.compile_threads_per_row(32, cpus=16) == 2


def test_rows_can_write_their_stacks_periodically(tmp_path, monkeypatch):
    def slow_measure(model, variant, device, budget_s):
        time.sleep(1.0)
        return bench.Row(model, variant, status="ok", ms=1.0)

    monkeypatch.setenv(bench.STACKS_ENV, f"{tmp_path}:0.2")
    monkeypatch.setattr(bench, "measure", slow_measure)
    monkeypatch.setattr(bench, "_die_with_parent", lambda: None)  # (this is the test process, not a row's)
    args = ["--row", "some-model", "some-variant", "--device", "cpu", "--row-out", str(tmp_path / "row.json")]
    assert bench._row_main(args) == 0 and json.loads((tmp_path / "row.json").read_text())["status"] == "ok"
    text = (tmp_path / "stacks-some-model-some-variant.txt").read_text()
    assert text.count("--- stacks ") >= 3 and "slow_measure" in text and "_row_main" in text
    time.sleep(0.5)  # the sampler stopped with the row: nothing more is written
    assert (tmp_path / "stacks-some-model-some-variant.txt").read_text() == text


def test_stack_sampler_keeps_no_frame_alive_between_samples(tmp_path):
    """A frame held by the sampler until its next sample keeps the frame's locals alive: on a GPU, CUDA-graph warm-up
    tensors, which cudagraph trees then reports as untracked live allocations."""
    import gc
    import weakref

    class Local:
        pass

    refs = []
    out = tmp_path / "stacks.txt"

    def sampled_while_running() -> None:
        obj = Local()
        refs.append(weakref.ref(obj))
        t0 = time.monotonic()
        while "sampled_while_running" not in out.read_text() and time.monotonic() - t0 < 30:
            time.sleep(0.01)

    sampler = bench.StackSampler(out, every_s=1.0)
    try:
        sampled_while_running()  # returns right after the first sample; the next one is a second away
        gc.collect()
        assert refs[0]() is None, "the sampler still holds the returned frame (and its locals)"
    finally:
        sampler.close()


def test_sampling_stacks_does_not_crash_a_busy_row(tmp_path, monkeypatch):
    """A row building DiT-XL/2 on CPU while its stacks are sampled every 0.2 s runs into its time limit; the former
    faulthandler-based dump killed it with SIGSEGV within seconds (2026-12-02, CI and locally). 30 s: on a loaded host
    (the suite on 12 workers beside GPU tests, 2026-12-04) the row's imports alone took 10 s, before any stack was
    sampled; on a machine of many cores the row may finish instead (ok, not a crash)."""
    monkeypatch.setenv(bench.STACKS_ENV, f"{tmp_path}:0.2")
    slow = bench._run_row_subprocess("dit-xl-2-512", "bf16-eager", "cpu", None, timeout_s=30, budget_s=0.1)
    assert slow.status in ("timeout", "ok"), slow.error
    assert (tmp_path / "stacks-dit-xl-2-512-bf16-eager.txt").read_text().count("--- stacks ") >= 10


def test_cli_refuses_unknown_names_and_missing_gpu(capsys):
    from qcompile.cli import main

    with pytest.raises(SystemExit, match="unknown model/variant"):
        main(["bench", "--models", "nope"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            main(["bench", "--models", "bundled-cifar10-dit"])


def test_cli_rows_runs_just_the_named_pairs_in_order(monkeypatch, tmp_path):
    from qcompile.cli import main

    with pytest.raises(SystemExit, match="MODEL:VARIANT"):
        main(["bench", "--rows", "dit-xl-2-512", "--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown model/variant"):
        main(["bench", "--rows", "dit-xl-2-512:nope", "--device", "cpu", "--out", str(tmp_path)])
    ran = []

    def fake_row(model, variant, device, gpu, timeout_s, budget_s, rows_dir=None, compile_threads=None):
        ran.append((model, variant))
        return bench.Row(model, variant, status="ok", ms=1.0)

    monkeypatch.setattr(bench, "_run_row_subprocess", fake_row)
    rows = ["sd15-unet-512:torchao-fp8-dynamic", "bundled-cifar10-ddpm:qdiff-w8a8-int8", "sd15-unet-512:bf16-inductor"]
    assert main(["bench", "--rows", *rows, "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert ran == [tuple(r.split(":")) for r in rows]  # not the 2 x 3 product of their models and variants
    assert {(r["model"], r["variant"]) for r in json.loads((tmp_path / "benchmarks.json").read_text())} == set(ran)


def test_run_bench_parallel_rows_report_each_row(monkeypatch):
    rows = bench.run_bench(["dit-xl-2-512"], ["no-such-variant", "also-missing"], "cpu", gpus=2, timeout_s=120, budget_s=0.1, progress=False)
    assert [(r.variant, r.status) for r in rows] == [("no-such-variant", "error"), ("also-missing", "error")]
    skipped = bench.run_bench(["dit-xl-2-512"], ["bf16-eager"], "cpu", gpus=1, timeout_s=120, budget_s=0.1, total_s=1.0, progress=False)
    assert skipped[0].status == "skipped"


def test_models_with_a_variant_list_get_only_those_rows():
    assert bench.MODELS["dit-xl-2-512-b1"].variants is not None and "qdiff-w4a16" in bench.MODELS["dit-xl-2-512-b1"].variants
    rows = bench.run_bench(["dit-xl-2-512-b1"], ["torchao-int8-dynamic", "bf16-eager"], "cpu", gpus=1, timeout_s=120, budget_s=0.1, total_s=1.0, progress=False)
    assert [r.variant for r in rows] == ["bf16-eager"]  # torchao is not one of the batch-1 model's variants


def test_jobs_per_gpu_share_a_gpu_and_one_rows_folder(monkeypatch):
    calls = []

    def fake_row(model, variant, device, gpu, timeout_s, budget_s, rows_dir=None, compile_threads=None):
        calls.append((variant, gpu, rows_dir))
        assert compile_threads == bench.compile_threads_per_row(6)
        return bench.Row(model, variant, status="ok", ms=1.0)

    monkeypatch.setattr(bench, "_run_row_subprocess", fake_row)
    variants = ["bf16-eager", "bf16-inductor", "qdiff-w8a8-fp8", "qdiff-w4a16", "qdiff-w8a8-int8", "qdiff-w4a8"]
    rows = bench.run_bench(["dit-xl-2-512"], variants, "cuda", gpus=2, timeout_s=60, budget_s=0.1, progress=False, jobs_per_gpu=3)
    assert [r.variant for r in rows] == variants and len(calls) == 6
    assert len({d for *_, d in calls}) == 1 and calls[0][2] is not None  # one registry for the whole host
    assert not Path(calls[0][2]).exists()  # removed after the run


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _busy_row(rows_dir: Path) -> subprocess.Popen:
    """A stand-in row: its own process group, registered, burning CPU."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    (rows_dir / str(proc.pid)).write_text("")
    return proc


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to read process states")
def test_timing_pauses_the_other_rows_and_continues_them(tmp_path):
    """While a row times, every other registered row (its whole process group) is stopped, then continued."""
    rows = [_busy_row(tmp_path) for _ in range(2)]
    try:
        time.sleep(0.3)
        assert [_state(p.pid) for p in rows] == ["R", "R"]
        with bench._registered(str(tmp_path)):
            assert (tmp_path / str(os.getpid())).exists()
            with bench._alone_on_host(str(tmp_path)) as paused:
                assert paused == 2  # not itself
                assert [_state(p.pid) for p in rows] == ["T", "T"]
            time.sleep(0.1)
            assert [_state(p.pid) for p in rows] == ["R", "R"]
        assert not (tmp_path / str(os.getpid())).exists()
    finally:
        for p in rows:
            p.kill()
            p.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to read process states")
def test_holding_the_host_ends_after_its_bound_while_the_block_goes_on(tmp_path):
    """A first call that outlasts its window (a torchao row compiling its kernels one by one) continues the others
    and frees the timing lock for them; the block itself goes on, and a first call's duration is recorded."""
    import fcntl

    rows = [_busy_row(tmp_path)]
    try:
        time.sleep(0.3)
        with bench._alone_on_host(str(tmp_path), max_s=0.6) as paused:
            assert paused == 1 and _state(rows[0].pid) == "T"
            time.sleep(1.0)
            assert _state(rows[0].pid) == "R" and not bench._HOST_HELD
            with open(tmp_path / ".timing", "a") as f:  # another row may take the lock now
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
        assert _state(rows[0].pid) == "R"
        first_calls = []
        slow = bench._exclusive_first_run(lambda x: time.sleep(0.5) or x, str(tmp_path), first_calls, alone_s=0.2)
        assert slow(3) == 3 and slow(4) == 4 and len(first_calls) == 1 and first_calls[0] >= 0.5
    finally:
        for p in rows:
            p.kill()
            p.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to read process states")
def test_a_compiled_graph_runs_its_first_call_alone_on_the_host(tmp_path):
    """In a multi-row run a compiled row's first call (autotuning, cuDNN's algorithm search) pauses the other rows,
    later calls do not; compiling itself does not; holding the host is re-entrant (a graph first run while timing)."""
    rows = [_busy_row(tmp_path)]
    states = []

    def backend(gm, example_inputs):  # stands in for Inductor / qdiff: records the other row's state per call
        def run(*args):
            states.append(_state(rows[0].pid))
            return gm.forward(*args)

        states.append(("compile", _state(rows[0].pid)))
        return run

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    try:
        time.sleep(0.3)
        with torch.no_grad():
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=lambda gm, ex: bench._exclusive_first_run(backend(gm, ex), str(tmp_path)))
            x = torch.randn(2, 4)
            torch.testing.assert_close(compiled(x), model(x))
            time.sleep(0.1)
            compiled(x)
            with bench._alone_on_host(str(tmp_path)) as paused:  # timing: a first run inside does not deadlock
                assert paused == 1
                torch._dynamo.reset()
                again = torch.compile(model, backend=lambda gm, ex: bench._exclusive_first_run(backend(gm, ex), str(tmp_path)))
                again(x)
        assert states[0] == ("compile", "R") and states[1] == "T" and states[2] == "R"
        assert states[-1] == "T"  # (held by the enclosing timing)
        time.sleep(0.1)
        assert _state(rows[0].pid) == "R"
    finally:
        for p in rows:
            p.kill()
            p.wait()


def test_bench_compiles_through_the_exclusive_wrapper_only_in_multi_row_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    model = torch.nn.Linear(2, 2)
    bench._compile(model, "inductor", "reduce-overhead", None)
    bench._compile(model, "qdiff", None, None, {"plan": "p"})
    bench._compile(model, "inductor", None, "/rows")
    assert calls[0] == {"backend": "inductor", "mode": "reduce-overhead"}
    assert calls[1] == {"backend": "qdiff", "options": {"plan": "p"}}
    assert set(calls[2]) == {"backend"} and callable(calls[2]["backend"])
    with pytest.raises(ValueError, match="unknown backend"):
        bench._compile(model, "tensorrt", None, "/rows")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to read process states")
def test_rows_left_stopped_by_a_killed_timer_are_continued(tmp_path):
    import signal

    row = _busy_row(tmp_path)
    try:
        os.killpg(row.pid, signal.SIGSTOP)  # as if a timing row had died holding the others
        time.sleep(0.1)
        assert _state(row.pid) == "T"
        bench._resume_if_nobody_times(str(tmp_path))
        time.sleep(0.1)
        assert _state(row.pid) == "R"
    finally:
        row.kill()
        row.wait()


def test_a_timed_out_row_is_killed_with_its_process_group(tmp_path):
    slow = bench._run_row_subprocess("dit-xl-2-512", "bf16-eager", "cpu", None, timeout_s=0.5, budget_s=0.1, rows_dir=str(tmp_path))
    assert slow.status == "timeout"
    assert bench._row_groups(str(tmp_path)) == []  # unregistered


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="rows die with the orchestrator through prctl (Linux)")
def test_rows_die_with_the_orchestrator(tmp_path):
    """Rows run in their own process groups; killing the orchestrator must not leave them running."""
    import signal

    cmd = [sys.executable, "-m", "qcompile.cli", "bench", "--device", "cpu", "--models", "bundled-cifar10-ddpm", "bundled-cifar10-dit",
           "--variants", "bf16-eager", "--jobs-per-gpu", "2", "--out", str(tmp_path / "out")]
    env = dict(os.environ, TMPDIR=str(tmp_path))
    orchestrator = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: list[int] = []
    deadline = time.monotonic() + 60
    while len(rows) < 2 and time.monotonic() < deadline:
        rows = [int(p.name) for d in tmp_path.glob("qdiff-bench-rows-*") for p in d.iterdir() if p.name.isdigit()]
        time.sleep(0.2)
    assert len(rows) == 2, "the rows did not register in time"
    orchestrator.send_signal(signal.SIGTERM)
    orchestrator.wait(10)
    time.sleep(1.0)
    alive = [pid for pid in rows if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    assert alive == []


def test_torchao_rows_skip_linears_its_kernels_reject():
    model = torch.nn.ModuleDict({"ok": torch.nn.Linear(32, 64), "few_rows": torch.nn.Linear(32, 64), "narrow_out": torch.nn.Linear(32, 12)})
    keep = bench.torchao_linears(model, {"ok": 128, "few_rows": 16, "narrow_out": 128})
    assert keep == {"ok"}  # M <= 16, and N = 12 (the bundled DiT's output projection) are left in bf16


class TinyLinearDenoiser(torch.nn.Module):
    """A linear torchao's kernels accept (M = 128 > 16; K, N multiples of 16)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 32)

    def forward(self, sample, timestep):
        return self.proj(sample.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + timestep.to(sample.dtype).view(-1, 1, 1, 1) / 1000


def test_torchao_rows_compile_with_inductor_defaults(monkeypatch):
    """torchao's configs turn on Inductor's coordinate-descent tuning process-wide by default (each kernel tuned at its
    first run: minutes of serial compiles on a GPU); the bench's torchao rows keep Inductor's defaults, like every row."""
    pytest.importorskip("torchao", reason="torchao is optional (the bench's torchao rows; not a test dependency)")
    import torch._inductor.config as inductor_config

    def inputs(device, dtype, t):
        return {"sample": torch.randn(2, 32, 8, 8).to(device, dtype), "timestep": torch.full((2,), t, device=device)}

    monkeypatch.setitem(bench.MODELS, "tiny-linear", bench.BenchModel("tiny-linear", "one linear", TinyLinearDenoiser, inputs))
    monkeypatch.setattr(inductor_config, "coordinate_descent_tuning", False)  # (restored whatever torchao does)
    row = bench.measure("tiny-linear", "torchao-int8-dynamic", "cpu", budget_s=0.05)
    assert row.status == "ok" and row.ms > 0 and row.quantized_ops.startswith("1/1 linears")
    assert row.extra["torchao_inductor_config"] == bench.TORCHAO_INDUCTOR_CONFIG
    assert inductor_config.coordinate_descent_tuning is False


def test_latency_guard_rows_need_a_gpu(tiny):
    """``qdiff-w8a8-fp8-guard`` times each fp8 op against bf16 on the GPU (qcompile.latency): on CPU the row fails
    and says why (the orchestrator records it as the row's error), instead of silently running the plain preset."""
    assert "qdiff-w8a8-fp8-guard" in bench.VARIANTS and "qdiff-w8a8-fp8-guard-cudagraphs" in bench.VARIANTS
    with pytest.raises(RuntimeError, match="GPU"):
        bench.measure(tiny, "qdiff-w8a8-fp8-guard", "cpu", budget_s=0.05)


def test_direct_conv_rows_run_with_the_engine_switch_in_their_process(tiny, monkeypatch):
    """``qdiff-w8a8-fp8-direct`` is the w8a8-fp8 preset with ``QDIFF_CONV_ENGINE=direct`` set for its row's process
    (recorded in the row); measured in a process without it, the row refuses instead of timing the default engine."""
    assert bench.row_environment("qdiff-w8a8-fp8-direct-cudagraphs") == {"QDIFF_CONV_ENGINE": "direct"}
    assert bench.row_environment("qdiff-w8a8-fp8-cudagraphs") == {}
    monkeypatch.delenv("QDIFF_CONV_ENGINE", raising=False)
    with pytest.raises(RuntimeError, match="QDIFF_CONV_ENGINE=direct"):
        bench.measure(tiny, "qdiff-w8a8-fp8-direct", "cpu", budget_s=0.05)
    monkeypatch.setenv("QDIFF_CONV_ENGINE", "direct")
    row = bench.measure(tiny, "qdiff-w8a8-fp8-direct", "cpu", budget_s=0.05)
    assert row.status == "ok" and row.quantized_ops == "2/2 ops" and row.extra["kernel_switches"] == {"QDIFF_CONV_ENGINE": "direct"}


def test_extern_prologue_rows_turn_the_quantize_pass_off_in_their_process(tiny, monkeypatch):
    """``qdiff-w8a8-fp8-extern-prologue`` is w8a8-fp8 with ``QDIFF_FP8_PASS_MIN_N=off`` (the act-quant placement
    before the separate pass after extern kernels): the A/B row of passes/act_quant's rule. The suffixes' variables
    are the ones the code reads."""
    from qcompile.backend import COORDINATE_DESCENT_ENV, MULTI_KERNEL_ENV
    from qcompile.lowering.conv_im2col import ENGINE_ENV
    from qcompile.passes.act_quant import ATTN_FP8_OUT_ENV, PASS_MIN_N_ENV
    from qcompile.passes.attention_heads import ENV as HEADS_ENV, FP8_QKV_ENV
    from qcompile.passes.norm_quant import ENV as NORM_QUANT_ENV
    from qcompile.lowering.kernels.w4_linear import DEQUANT_MM_ENV, GEMV_ENV, SPLITK_ENV, SPLITK_MEDIUM_ENV
    from qcompile.lowering.kernels.fp8_attention import SOFTMAX_ENV, SOFTMAX_MODES
    from qcompile.lowering.triton_lowering import V_ONES_ENV

    assert {name for name, _ in bench.ROW_ENV_SUFFIXES.values()} == {ENGINE_ENV, PASS_MIN_N_ENV, MULTI_KERNEL_ENV, HEADS_ENV, ATTN_FP8_OUT_ENV,
                                                                 COORDINATE_DESCENT_ENV, NORM_QUANT_ENV, FP8_QKV_ENV, SPLITK_ENV,
                                                                 SPLITK_MEDIUM_ENV, DEQUANT_MM_ENV, GEMV_ENV, SOFTMAX_ENV, V_ONES_ENV}
    # one suffix per softmax mode of the kernel, each setting its mode ("-softmax-ex2-lv" is not "-softmax-ex2")
    assert sorted(v for n, v in bench.ROW_ENV_SUFFIXES.values() if n == SOFTMAX_ENV) == sorted(SOFTMAX_MODES)
    assert bench.row_environment("qdiff-w8a8-fp8-attn-softmax-ex2-lv-cudagraphs") == {SOFTMAX_ENV: "ex2-lv"}
    assert bench.row_environment("qdiff-w8a8-fp8-attn-v-ones-cudagraphs") == {V_ONES_ENV: "1"}
    assert "qdiff-w8a8-fp8-attn-v-ones-cudagraphs" in bench.VARIANTS
    assert bench.row_environment("qdiff-w4a16-splitk-cudagraphs") == {SPLITK_ENV: "1"}
    assert bench.row_environment("qdiff-w4a16-dequant-mm-cudagraphs") == {DEQUANT_MM_ENV: "1"}
    assert bench.row_environment("qdiff-w4a16-no-dequant-mm-cudagraphs") == {DEQUANT_MM_ENV: "0"}
    assert bench.row_environment("qdiff-w4a16-no-gemv-cudagraphs") == {GEMV_ENV: "0"}
    assert bench.row_environment("qdiff-w4a16-splitk-medium-cudagraphs") == {SPLITK_MEDIUM_ENV: "1"}
    assert bench.row_environment("qdiff-w8a8-fp8-attn-fp8-out-cudagraphs") == {ATTN_FP8_OUT_ENV: "1"}
    # suffixes stack (both fp8-attention epilogues in one row)
    assert "qdiff-w8a8-fp8-attn-heads-fp8-out-cudagraphs" in bench.VARIANTS
    assert bench.row_environment("qdiff-w8a8-fp8-attn-fp8-out-normq-cudagraphs") == {NORM_QUANT_ENV: "1", ATTN_FP8_OUT_ENV: "1"}
    assert bench.row_environment("qdiff-w8a8-fp8-attn-heads-fp8-out-cudagraphs") == {ATTN_FP8_OUT_ENV: "1", HEADS_ENV: "1"}
    # a suffix that ends like a shorter one is itself (the "off" rows of the default-on switches)
    assert bench.row_environment("qdiff-w8a8-fp8-attn-float-out-no-normq-cudagraphs") == {NORM_QUANT_ENV: "0", ATTN_FP8_OUT_ENV: "0"}
    assert bench.row_environment("qdiff-w8a8-fp8-attn-separate-heads") == {HEADS_ENV: "0"}
    assert "qdiff-w8a8-fp8-attn-float-out-no-normq-cudagraphs" in bench.VARIANTS
    assert bench.row_environment("qdiff-w8a8-fp8-attn-fp8-qkv-cudagraphs") == {FP8_QKV_ENV: "1"}
    assert bench.row_environment("qdiff-w8a8-fp8-attn-float-qkv-cudagraphs") == {FP8_QKV_ENV: "0"}
    assert "qdiff-w8a8-fp8-attn-float-qkv-cudagraphs" in bench.VARIANTS
    assert bench.row_environment("qdiff-w8a8-fp8-extern-prologue-cudagraphs") == {PASS_MIN_N_ENV: "off"}
    monkeypatch.delenv(PASS_MIN_N_ENV, raising=False)
    with pytest.raises(RuntimeError, match="QDIFF_FP8_PASS_MIN_N=off"):
        bench.measure(tiny, "qdiff-w8a8-fp8-extern-prologue", "cpu", budget_s=0.05)
    monkeypatch.setenv(PASS_MIN_N_ENV, "off")
    row = bench.measure(tiny, "qdiff-w8a8-fp8-extern-prologue", "cpu", budget_s=0.05)
    assert row.status == "ok" and row.extra["kernel_switches"] == {PASS_MIN_N_ENV: "off"}


def test_multi_kernel_rows_patch_inductor_in_their_process(tiny, monkeypatch):
    """``-multikernel`` / ``-single-kernel`` set ``QDIFF_MULTI_KERNEL`` for the row (default off, Inductor's default),
    which reaches Inductor's config patches."""
    from qcompile.backend import MULTI_KERNEL_ENV, multi_kernel_from_env

    assert bench.row_environment("bf16-inductor-multikernel-cudagraphs") == {MULTI_KERNEL_ENV: "1"}
    assert bench.row_environment("qdiff-w8a8-fp8-attn-single-kernel") == {MULTI_KERNEL_ENV: "0"}
    monkeypatch.delenv(MULTI_KERNEL_ENV, raising=False)
    assert multi_kernel_from_env(True) and not multi_kernel_from_env(False)
    monkeypatch.setenv(MULTI_KERNEL_ENV, "yes")
    with pytest.raises(ValueError, match="QDIFF_MULTI_KERNEL must be 0 or 1"):
        multi_kernel_from_env(True)
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    monkeypatch.setenv(MULTI_KERNEL_ENV, "1")
    bench._compile(torch.nn.Linear(2, 2), "inductor", "reduce-overhead", None)
    monkeypatch.setenv(MULTI_KERNEL_ENV, "0")
    bench._compile(torch.nn.Linear(2, 2), "inductor", None, None)
    monkeypatch.setenv("QDIFF_COORDINATE_DESCENT", "1")  # (-cdtune rows)
    bench._compile(torch.nn.Linear(2, 2), "inductor", None, None)
    assert seen == [{"backend": "inductor", "options": {"triton.cudagraphs": True, "triton.multi_kernel": 1}},
                    {"backend": "inductor", "mode": None},
                    {"backend": "inductor", "options": {"coordinate_descent_tuning": True}}]
    assert bench.row_environment("bf16-inductor-cdtune-cudagraphs") == {"QDIFF_COORDINATE_DESCENT": "1"}


def test_rows_of_one_model_and_preset_share_one_calibration(tiny, tmp_path, monkeypatch):
    """In a multi-row run the first qdiff row of a (model, preset) calibrates and saves the plan in the run's folder;
    the next loads it (same quantizers) instead of calibrating again; another preset calibrates its own."""
    import importlib

    calibrate_mod = importlib.import_module("qcompile.calibrate")  # (the package exports a function of that name)
    calls = []
    real = calibrate_mod.calibrate
    monkeypatch.setattr(calibrate_mod, "calibrate", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setenv(bench.ROWS_ENV, str(tmp_path))
    monkeypatch.delenv(bench.PLANS_ENV, raising=False)  # (shared within the run only)
    first = bench.measure(tiny, "qdiff-w8a8-int8", "cpu", budget_s=0.05)
    second = bench.measure(tiny, "qdiff-w8a8-int8-cudagraphs", "cpu", budget_s=0.05)
    other = bench.measure(tiny, "qdiff-w4a16", "cpu", budget_s=0.05)
    assert [r.status for r in (first, second, other)] == ["ok"] * 3 and len(calls) == 2
    assert first.extra["plan"].startswith("calibrated in this row, saved as tiny-w8a8-int8.qplan")
    assert second.extra["plan"].startswith("loaded from tiny-w8a8-int8.qplan")
    assert sorted(p.name for p in (tmp_path / "plans").glob("*.qplan")) == ["tiny-w4a16.qplan", "tiny-w8a8-int8.qplan"]


def test_plans_kept_with_the_plans_flag_serve_a_later_run(tiny, tmp_path, monkeypatch):
    """``--plans DIR`` (``QDIFF_BENCH_PLANS``): a plan calibrated in one run is loaded by a row of a later run."""
    monkeypatch.delenv(bench.ROWS_ENV, raising=False)
    monkeypatch.setenv(bench.PLANS_ENV, str(tmp_path / "plans"))
    first = bench.measure(tiny, "qdiff-w8a8-int8", "cpu", budget_s=0.05)
    later = bench.measure(tiny, "qdiff-w8a8-int8", "cpu", budget_s=0.05)
    assert first.extra["plan"].startswith("calibrated in this row") and later.extra["plan"].startswith("loaded from tiny-w8a8-int8.qplan")
    assert later.status == "ok" and later.calibration_s < first.calibration_s
