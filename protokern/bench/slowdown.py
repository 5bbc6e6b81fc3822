"""How much a call slows down under a competing load (``protokern bench --load N``), judged
against the fastest naive contender's slowdown, with an interval from resampling the rounds.

Why an interval: one case's loaded median moves by about +-0.3 of its slowdown from run to run,
with where the scheduler puts the threads when the load resumes, so a single reading of "our
slowdown against the naive one" lands either side of 1 by chance (benchmarks/NOTES.md, "The
loaded clause, measured three ways"). With ``--load-rounds R`` each state's times are R rounds of
``repeats`` calls, and round r of every contender of a case ran, quiet then loaded, within tens
of seconds; resampling whole rounds, the same ones for both contenders, keeps what neighbouring
rounds share (the machine's slow drift; the threads' placement is new at every resume of the
load) and tells a systematic difference from the noise between rounds. The interval is a
percentile bootstrap over 6-8 rounds: nominally 90%, and narrower than the spread between runs
(cub14's forward read 0.81 (0.77-0.85) in one run, 0.89 (0.80-0.99) in another), so a row is
told apart from parity only when its interval clears 1 by a margin.

Why a fair share: it is what a call whose every thread is busy loses when the scheduler grants
every runnable thread an equal share of the cores. With T threads, N single-threaded competitors
and C cores each runnable thread then gets C / (T + N) of a core where T + N > C, so a perfectly
parallel call slows by min(T, C) (T + N) / (T C): 1.5 for 2 threads, 1 competitor, 2 cores. It is
a reference line, not a floor: Linux balances the number of runnable threads per core, so with 3
threads on 2 cores one core holds two of them; when those are the call's own the call gets one
core (slowdown 2), when one of them is the competitor the call gets one and a half (4/3, if its
work moves to the thread with the whole core). protokern's CPU kernels keep their helper threads
off the caller's core for that reason (csrc/cpu/task_pool.h). A call also loses less than the
fair share in serial stretches (one thread, which then has a core to itself) or waiting on memory.
"""

import random
import statistics
from collections.abc import Sequence

RESAMPLES = 2000
"""Round resamples behind an interval: its ends move by about 0.01 between seeds."""


def fair_share_slowdown(threads: int, load: int, cores: int) -> float:
    """A perfectly parallel call's slowdown when ``load`` single-threaded processes compete with
    its ``threads`` threads for ``cores`` cores and each runnable thread gets an equal share of
    them (the module's docstring says why a call can lose less).
    ValueError unless threads and cores are >= 1 and load >= 0."""
    if threads < 1 or cores < 1 or load < 0:
        raise ValueError(f"threads and cores must be >= 1 and load >= 0, got threads {threads}, "
                         f"load {load}, cores {cores}")
    if threads + load <= cores:
        return 1.0
    return min(threads, cores) * (threads + load) / (threads * cores)


def rounds_of(record: dict) -> list[list[float]]:
    """A pooled record's times split back into its rounds (``rounds`` equal runs, in order)."""
    times, rounds = record["times_s"], record.get("rounds", 1)
    if rounds < 1 or len(times) % rounds:
        raise ValueError(f"{len(times)} times do not split into {rounds} equal rounds")
    size = len(times) // rounds
    return [times[i * size:(i + 1) * size] for i in range(rounds)]


def _pooled_median(rounds: Sequence[Sequence[float]], picks: Sequence[int]) -> float:
    return statistics.median(t for i in picks for t in rounds[i])


def slowdown_against(quiet: dict, loaded: dict, naive_quiet: dict, naive_loaded: dict,
                     seed: int | str = 0) -> dict:
    """A contender's slowdown (loaded median / quiet median), the naive contender's, their ratio
    (``relative``: below 1, the contender degrades less) and, with 2 or more rounds, a nominal
    90% interval of that ratio over round resamples (``relative_interval``, else None; a
    percentile bootstrap, ``seed`` for its draws). The rounds are drawn by index, one draw for
    all four records where both contenders ran the same number of rounds (the runner runs round
    r of every contender of a case, quiet then loaded, before round r + 1: what the machine's
    drift did to both cancels), else one draw per contender."""
    ours = rounds_of(quiet), rounds_of(loaded)
    theirs = rounds_of(naive_quiet), rounds_of(naive_loaded)
    if len(ours[0]) != len(ours[1]) or len(theirs[0]) != len(theirs[1]):
        raise ValueError("a quiet and a loaded record must have the same number of rounds")
    slowdown = loaded["median_s"] / quiet["median_s"]
    naive = naive_loaded["median_s"] / naive_quiet["median_s"]
    interval = None
    if min(len(ours[0]), len(theirs[0])) >= 2:
        generator = random.Random(seed)
        ratios = []
        for _ in range(RESAMPLES):
            mine = generator.choices(range(len(ours[0])), k=len(ours[0]))
            other = (mine if len(theirs[0]) == len(ours[0]) else
                     generator.choices(range(len(theirs[0])), k=len(theirs[0])))
            ratios.append((_pooled_median(ours[1], mine) / _pooled_median(ours[0], mine))
                          / (_pooled_median(theirs[1], other) / _pooled_median(theirs[0], other)))
        ratios.sort()
        interval = [ratios[int(0.05 * RESAMPLES)], ratios[int(0.95 * RESAMPLES) - 1]]
    return {"slowdown": slowdown, "naive_slowdown": naive, "relative": slowdown / naive,
            "relative_interval": interval}


def add_slowdowns(results: list[dict]) -> None:
    """In place, on each loaded record that has a quiet twin: ``slowdown`` (loaded / quiet); on
    those not of kind ``naive``, also ``slowdown_naive`` (which contender), ``naive_slowdown``,
    ``slowdown_vs_naive`` and ``slowdown_vs_naive_interval`` (`slowdown_against`, seeded by the
    case), against the naive contender that was fastest quiet in the same (shape, dtype, pass):
    the loaded record's own ``best_naive`` is the fastest under the load, which can be another
    one. A naive contender whose loaded run failed leaves the row without a comparison."""
    def case(r: dict) -> tuple:
        return r["shape"], r["dtype"], r["pass"], r["contender"], r.get("load", 0)

    by_case = {case(r): r for r in results if r["status"] == "ok"}
    for (shape, dtype, pass_name, contender, load), r in by_case.items():
        twin = by_case.get((shape, dtype, pass_name, contender, 0))
        if not load or twin is None:
            continue
        r["slowdown"] = r["median_s"] / twin["median_s"]
        naive = twin.get("best_naive")
        naive_quiet = by_case.get((shape, dtype, pass_name, naive, 0))
        naive_loaded = by_case.get((shape, dtype, pass_name, naive, load))
        if r["kind"] == "naive" or naive_quiet is None or naive_loaded is None:
            continue
        judged = slowdown_against(twin, r, naive_quiet, naive_loaded,
                                  seed=f"{shape} {dtype} {pass_name} {contender} {load}")
        r["slowdown_naive"] = naive
        r["naive_slowdown"] = judged["naive_slowdown"]
        r["slowdown_vs_naive"] = judged["relative"]
        r["slowdown_vs_naive_interval"] = judged["relative_interval"]
