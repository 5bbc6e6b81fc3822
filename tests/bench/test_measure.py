"""The benchmark's memory probe sees real allocations (its peak is that of the case alone)."""

from protokern.bench.measure import CaseSpec, IsolatedRunner
from protokern.bench.shapes import NamedShape


def test_memory_probe_sees_an_allocation():
    """The bare GEMM of a (50, 4) x (4, 1e6) problem writes a 200 MB output."""
    big = NamedShape("alloc_200mb", 50, 4, 1, 1, 1_000_000)
    small = NamedShape("alloc_small", 4, 4, 1, 1, 1000)
    runner = IsolatedRunner()
    big_result = runner.run(CaseSpec(big, "float32", "cpu", "floor_mm", "forward", 1, 0, 1))
    small_result = runner.run(CaseSpec(small, "float32", "cpu", "floor_mm", "forward", 1, 0, 1))
    assert big_result["status"] == small_result["status"] == "ok"
    assert 150e6 <= big_result["peak_bytes"] <= 400e6, big_result
    assert small_result["peak_bytes"] < 50e6, small_result
