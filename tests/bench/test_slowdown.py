"""The loaded clause's arithmetic: a fair share of the cores, the rounds of a pooled record, and a
contender's slowdown against the naive one's with an interval over resampled rounds."""

import subprocess
import sys

import pytest

from protokern.bench.load import ensure_running
from protokern.bench.measure import summarize
from protokern.bench.report import format_load_comparison
from protokern.bench.slowdown import (
    add_slowdowns,
    fair_share_slowdown,
    rounds_of,
    slowdown_against,
)


def test_fair_share_is_what_the_competitors_take_from_a_parallel_call():
    assert fair_share_slowdown(2, 1, 2) == pytest.approx(1.5)
    assert fair_share_slowdown(2, 2, 2) == pytest.approx(2.0)
    assert fair_share_slowdown(1, 1, 2) == 1.0  # a free core for each
    assert fair_share_slowdown(4, 0, 2) == 1.0  # oversubscribed already, nothing competes
    assert fair_share_slowdown(4, 2, 2) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="threads and cores"):
        fair_share_slowdown(0, 1, 2)
    with pytest.raises(ValueError, match="threads and cores"):
        fair_share_slowdown(2, -1, 2)


def _record(rounds: list[list[float]], contender="protokern:cpu", kind="protokern", load=0,
            **extra) -> dict:
    times = [t for r in rounds for t in r]
    return {"shape": "cub", "dtype": "float32", "pass": "forward", "contender": contender,
            "kind": kind, "load": load, "status": "ok", "times_s": times, **summarize(times),
            "rounds": len(rounds), **extra}


def test_a_pooled_record_splits_back_into_its_rounds():
    record = _record([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert rounds_of(record) == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    with pytest.raises(ValueError, match="equal rounds"):
        rounds_of({**record, "rounds": 4})


def test_the_relative_slowdown_and_its_interval_over_rounds():
    quiet = _record([[1.0, 1.0]] * 4)
    loaded = _record([[1.5, 1.5]] * 4, load=1)
    naive_quiet = _record([[4.0, 4.0]] * 4, "naive_cdist", "naive")
    naive_loaded = _record([[8.0, 8.0]] * 4, "naive_cdist", "naive", load=1)
    judged = slowdown_against(quiet, loaded, naive_quiet, naive_loaded)
    assert judged["slowdown"] == pytest.approx(1.5)
    assert judged["naive_slowdown"] == pytest.approx(2.0)
    assert judged["relative"] == pytest.approx(0.75)
    assert judged["relative_interval"] == pytest.approx([0.75, 0.75])  # nothing varies

    # one loaded round twice as slow as the others: the interval widens around the estimate and
    # reaches past 1 (a round like it drawn often enough makes us look worse than the naive)
    noisy = _record([[1.5, 1.5], [1.5, 1.5], [1.5, 1.5], [3.5, 3.5]], load=1)
    judged = slowdown_against(quiet, noisy, naive_quiet, naive_loaded)
    low, high = judged["relative_interval"]
    assert low <= judged["relative"] <= high
    assert low == pytest.approx(0.75) and high > 1.0
    # the same seed, the same interval
    assert slowdown_against(quiet, noisy, naive_quiet, naive_loaded)["relative_interval"] == [
        low, high]

    # a round that slowed both contenders alike (the machine, not the code) cancels: the rounds
    # are drawn together for both
    both_slow = slowdown_against(quiet, noisy, naive_quiet,
                                 _record([[8.0, 8.0]] * 3 + [[8 * 3.5 / 1.5] * 2], load=1))
    assert both_slow["relative_interval"][1] - both_slow["relative_interval"][0] < 0.1
    # unequal rounds (no pairing possible) still give an interval around the estimate
    apart = slowdown_against(quiet, noisy, _record([[4.0, 4.0]] * 2, "naive_cdist", "naive"),
                             _record([[8.0, 8.0]] * 2, "naive_cdist", "naive", load=1))
    assert apart["relative_interval"][0] <= apart["relative"] <= apart["relative_interval"][1]

    single = slowdown_against(_record([[1.0]]), _record([[1.5]], load=1),
                              _record([[4.0]], "naive_cdist", "naive"),
                              _record([[8.0]], "naive_cdist", "naive", load=1))
    assert single["relative"] == pytest.approx(0.75) and single["relative_interval"] is None
    with pytest.raises(ValueError, match="same number of rounds"):
        slowdown_against(quiet, _record([[1.5, 1.5]] * 3, load=1), naive_quiet, naive_loaded)


def test_loaded_records_get_their_slowdown_against_the_fastest_naive_contender():
    results = [
        _record([[1.0, 1.0]] * 2, best_naive="naive_cdist"),
        _record([[1.4, 1.6]] * 2, load=1),
        _record([[4.0, 4.0]] * 2, "naive_cdist", "naive", best_naive="naive_cdist"),
        _record([[8.0, 8.0]] * 2, "naive_cdist", "naive", load=1),
        _record([[9.0, 9.0]] * 2, "naive_conv", "naive", best_naive="naive_cdist"),
        _record([[9.0, 9.0]] * 2, "naive_conv", "naive", load=1),  # slowdown 1: not the one
    ]
    add_slowdowns(results)
    ours = results[1]
    assert ours["slowdown_naive"] == "naive_cdist"
    assert ours["slowdown"] == pytest.approx(1.5)
    assert ours["naive_slowdown"] == pytest.approx(2.0)
    assert ours["slowdown_vs_naive"] == pytest.approx(0.75)
    low, high = ours["slowdown_vs_naive_interval"]
    assert low <= 0.75 <= high
    assert results[3]["slowdown"] == pytest.approx(2.0) and "naive_slowdown" not in results[3]
    assert "slowdown" not in results[0]  # quiet records keep only their times

    table = format_load_comparison(results, fair_share=1.5)
    assert "fair-share slowdown: 1.50x" in table
    row = next(line for line in table.splitlines() if "protokern:cpu" in line)
    assert "2.00x" in row and "0.75" in row and row.rstrip().endswith("naive_cdist")


def test_the_naive_compared_with_is_the_fastest_quiet_and_a_failed_one_is_skipped():
    """Under the load conv is the faster naive here (its loaded best_naive), but the comparison
    is with cdist, the fastest quiet; a failed loaded naive run leaves no comparison."""
    results = [
        _record([[1.0, 1.0]] * 2, best_naive="naive_cdist"),
        _record([[1.5, 1.5]] * 2, load=1, best_naive="naive_conv"),
        _record([[4.0, 4.0]] * 2, "naive_cdist", "naive", best_naive="naive_cdist"),
        _record([[12.0, 12.0]] * 2, "naive_cdist", "naive", load=1),
        _record([[5.0, 5.0]] * 2, "naive_conv", "naive", best_naive="naive_cdist"),
        _record([[6.0, 6.0]] * 2, "naive_conv", "naive", load=1),
    ]
    add_slowdowns(results)
    assert results[1]["slowdown_naive"] == "naive_cdist"
    assert results[1]["naive_slowdown"] == pytest.approx(3.0)
    assert results[1]["slowdown_vs_naive"] == pytest.approx(0.5)

    results[3] = {**results[3], "status": "error", "reason": "boom"}
    for r in results:
        for key in ("slowdown", "slowdown_naive", "naive_slowdown", "slowdown_vs_naive",
                    "slowdown_vs_naive_interval"):
            r.pop(key, None)
    add_slowdowns(results)
    assert results[1]["slowdown"] == pytest.approx(1.5) and "naive_slowdown" not in results[1]


def test_a_load_process_that_died_is_an_error():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    with pytest.raises(RuntimeError, match="exited mid-plan"):
        ensure_running([process])
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        ensure_running([alive])
    finally:
        alive.kill()
        alive.wait()
