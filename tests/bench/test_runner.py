"""The benchmark's runner: cases over the memory cap are skipped with the reason; unknown shapes,
passes and contenders are clear errors; ``load`` runs every case quiet and under competing
processes, side by side."""

import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from protokern.bench.load import competing_load, paused
from protokern.bench.report import format_load_comparison, format_table
from protokern.bench.runner import BenchConfig, run_cases
from protokern.bench.shapes import parse_shapes


def test_cases_over_the_memory_cap_are_skipped_with_the_reason():
    config = BenchConfig(shapes=parse_shapes("large_bank"), passes=["forward"],
                         contenders=["naive_conv"], memory_cap_bytes=1 << 30)
    (result,) = run_cases(config)
    assert result["status"] == "skipped" and "memory cap" in result["reason"]
    assert result["estimated_bytes"] > 1 << 30


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown shape"):
        parse_shapes("cub,nope")
    with pytest.raises(ValueError, match="passes"):
        BenchConfig(shapes=parse_shapes("tiny"), passes=["sideways"])
    with pytest.raises(ValueError, match="not available"):
        BenchConfig(shapes=parse_shapes("tiny"), contenders=["nope"]).selected_contenders()
    with pytest.raises(ValueError, match="load must be >= 0"):
        BenchConfig(shapes=parse_shapes("tiny"), load=-1)
    with pytest.raises(ValueError, match="load_rounds must be >= 1"):
        BenchConfig(shapes=parse_shapes("tiny"), load=1, load_rounds=0)
    with pytest.raises(ValueError, match="1 without a load"):
        BenchConfig(shapes=parse_shapes("tiny"), load_rounds=2)


def test_competing_load_runs_its_processes_and_kills_them():
    with competing_load(2) as processes:
        assert len(processes) == 2 and all(p.poll() is None for p in processes)
    assert all(p.poll() is not None for p in processes)


def _state_letter(pid: int) -> str:
    """Process ``pid``'s state letter in /proc/PID/stat (R, S, T: stopped, Z: zombie), or X
    where the process no longer exists."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "X"


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie not yet reaped counts as exited)."""
    return _state_letter(pid) in "ZX"


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc/PID/stat (Linux)")
def test_load_processes_end_when_the_bench_is_killed():
    # SIGKILL runs no finally block: the load must notice by itself that its parent is gone
    bench = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom protokern.bench.load import competing_load\n"
         "with competing_load(1) as processes:\n    print(processes[0].pid, flush=True)\n"
         "    time.sleep(600)\n"], stdout=subprocess.PIPE, text=True)
    load_pid = int(bench.stdout.readline())
    assert not _gone(load_pid)
    bench.kill()
    bench.wait()
    deadline = time.monotonic() + 20
    while not _gone(load_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = _gone(load_pid)
    if not gone:
        os.kill(load_pid, signal.SIGKILL)
    assert gone, "the load process outlived the bench that started it"


def _state(process, waiting_for: str) -> str:
    """The process's state letter in /proc/PID/stat (T: stopped), polled for up to a second
    until it is one of ``waiting_for`` (a signal takes effect when the process next runs)."""
    for _ in range(100):
        state = _state_letter(process.pid)
        if state in waiting_for:
            break
        time.sleep(0.01)
    return state


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc/PID/stat (Linux)")
def test_a_paused_load_is_stopped_and_goes_on_after():
    with competing_load(1) as processes:
        with paused(processes):
            assert _state(processes[0], "T") == "T"
        assert _state(processes[0], "RS") in "RS"
        assert processes[0].poll() is None


def test_load_runs_every_case_quiet_then_loaded_side_by_side():
    config = BenchConfig(shapes=parse_shapes("tiny"), passes=["forward"],
                         contenders=["protokern:reference", "naive_cdist", "floor_mm"],
                         repeats=2, warmup=0, threads=1, load=1, isolate=False)
    results = run_cases(config)
    assert [(r["contender"], r["load"]) for r in results] == [
        ("protokern:reference", 0), ("protokern:reference", 1), ("naive_cdist", 0),
        ("naive_cdist", 1), ("floor_mm", 0), ("floor_mm", 1)]
    assert all(r["status"] == "ok" and r["ratio_to_floor"] > 0 for r in results)
    # each load level is compared with its own floor
    assert results[5]["ratio_to_floor"] == pytest.approx(1.0)
    assert "under load 1" in format_table(results)
    # the loaded records' slowdowns, ours against the naive contender's (one round: no interval)
    ours, naive = results[1], results[3]
    assert ours["slowdown"] == pytest.approx(ours["median_s"] / results[0]["median_s"])
    assert ours["naive_slowdown"] == pytest.approx(naive["slowdown"])
    assert ours["slowdown_vs_naive"] == pytest.approx(ours["slowdown"] / naive["slowdown"])
    assert ours["slowdown_vs_naive_interval"] is None
    comparison = format_load_comparison(results)
    row = next(line for line in comparison.splitlines() if "protokern:reference" in line)
    assert f"{ours['slowdown_vs_naive']:.2f}" in row and row.rstrip().endswith("naive_cdist")
    assert format_load_comparison([r for r in results if r["load"] == 0]) == ""


def test_load_rounds_pool_each_state_times_into_one_record():
    config = BenchConfig(shapes=parse_shapes("tiny"), passes=["forward"],
                         contenders=["floor_mm"], repeats=2, warmup=0, threads=1, load=1,
                         load_rounds=3, isolate=False)
    quiet, loaded = run_cases(config)
    assert (quiet["load"], loaded["load"]) == (0, 1)
    for record in (quiet, loaded):
        assert record["status"] == "ok" and record["rounds"] == 3
        assert len(record["times_s"]) == 6
        assert record["median_s"] == pytest.approx(statistics.median(record["times_s"]))
        assert "peak_bytes" in record  # from the first round


def test_load_rounds_go_round_by_round_across_the_contenders(monkeypatch):
    """Round r of every contender before round r + 1 of any, each quiet then loaded, so that two
    contenders' rounds of one index ran seconds apart; each contender's pooled records leave as
    soon as its last round is done (a checkpoint per contender)."""
    from protokern.bench import runner

    calls = []

    def fake_run(config, isolated, shape, dtype, pass_name, contender, load, part):
        calls.append((contender.name, load))
        record = runner.case_record(shape, dtype, config.device, contender, pass_name)
        slow = 2.0 if load else 1.0
        return {**record, "load": load, "status": "ok", "times_s": [slow, slow],
                "median_s": slow, "peak_bytes": 0}

    monkeypatch.setattr(runner, "_run_one", fake_run)
    saved = []
    config = BenchConfig(shapes=parse_shapes("tiny"), passes=["forward"],
                         contenders=["protokern:reference", "naive_cdist"], repeats=2, warmup=0,
                         threads=1, load=1, load_rounds=2, isolate=False)
    results = run_cases(config, checkpoint=lambda partial: saved.append(len(partial)))
    round_calls = [("protokern:reference", 0), ("protokern:reference", 1), ("naive_cdist", 0),
                   ("naive_cdist", 1)]
    assert calls == round_calls * 2
    assert saved == [2, 4]
    assert [(r["contender"], r["load"], r["rounds"]) for r in results] == [
        (name, load, 2) for name, load in round_calls]
    assert results[1]["slowdown_vs_naive"] == pytest.approx(1.0)
    assert results[1]["slowdown_naive"] == "naive_cdist"


def test_the_host_is_recorded_by_family_and_model(tmp_path, monkeypatch):
    """A bare hypervisor model name ("AMD EPYC") is told apart by the CPU's family and model."""
    import builtins

    from protokern.bench import runner

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n"
                       "model\t\t: 17\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f\n\n"
                       "processor\t: 1\ncpu family\t: 99\nmodel\t\t: 1\nflags\t\t: fpu\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(
        cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
    assert runner.cpu_family_model() == "family 25 model 17"
    assert runner.device_name("cpu") == "AMD EPYC"
    assert runner.cpu_isa() == ["AVX-512", "AVX2"]
    environment = runner.environment(BenchConfig(shapes=parse_shapes("tiny")), ["protokern"])
    assert environment["cpu_family_model"] == "family 25 model 17"
