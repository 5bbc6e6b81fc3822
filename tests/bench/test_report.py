"""The benchmark's reports: the JSON file is standard JSON (no NaN or Infinity)."""

import json
import math

from protokern.bench.report import write_json


def test_write_json_turns_non_finite_floats_into_null(tmp_path):
    inf, nan = float("inf"), float("nan")
    results = [{"shape": "tiny", "contender": "naive_loop", "status": "ok", "median_s": 0.5,
                "speedup_vs_best_naive": inf, "ratio_to_floor": nan,
                "times_s": [0.5, -inf, nan], "nested": {"quartiles": (nan, 1.5)}}]
    path = tmp_path / "out" / "bench.json"
    write_json(path, {"load_average": [nan, 1.0]}, results, scaling=[{"median_s": inf}])

    def reject(constant: str):
        raise AssertionError(f"non-standard JSON constant {constant}")

    document = json.loads(path.read_text(), parse_constant=reject)
    (r,) = document["results"]
    assert r["median_s"] == 0.5
    assert r["speedup_vs_best_naive"] is None and r["ratio_to_floor"] is None
    assert r["times_s"] == [0.5, None, None]
    assert r["nested"] == {"quartiles": [None, 1.5]}
    assert document["environment"] == {"load_average": [None, 1.0]}
    assert document["scaling"] == [{"median_s": None}]
    assert "tiny" in document["shapes"]
    assert math.isinf(results[0]["speedup_vs_best_naive"])  # the caller's results untouched
