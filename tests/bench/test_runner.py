"""The benchmark's runner: cases over the memory cap are skipped with the reason; unknown shapes,
passes and contenders are clear errors."""

import pytest

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
