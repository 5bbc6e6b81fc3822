"""pytest plugin for the device check's test run on a GPU (``-p gpu_test_run``, with
benchmarks/ on the path; benchmarks/gpu_check.sh):

- every autotuned Triton kernel of protokern launches its first configuration only
  (`protokern.backends.triton.launch.Tuned.narrowed`), so a test shape costs one compilation
  per kernel specialisation instead of one per configuration (the benchmark, not the tests,
  exercises the autotuner);
- the contract tests' ``reference@cuda`` cases are deselected: on a GPU host the fixture runs
  the reference (plain PyTorch, the tests' oracle) on CUDA tensors too, 377 tests that check
  no GPU kernel of ours; the device's minutes go to ``cuda@cuda`` and ``triton@cuda``.
"""

SKIPPED_BACKENDS = {("reference", "cuda")}


def pytest_configure(config) -> None:
    # at configure time, not import: tests/conftest.py (loaded before this hook runs) sets
    # TRITON_INTERPRET where there is no GPU, which protokern reads when it is imported
    try:
        from protokern.backends.triton import launch
    except ImportError as error:  # no triton: nothing to narrow
        config.issue_config_time_warning(UserWarning(f"gpu_test_run: {error}"), 2)
        return
    launch.Tuned.narrowed = True


def backend_pair(item) -> tuple | None:
    """The ``(backend, device)`` a test runs on through the backend fixtures, or None."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return next((params[key] for key in ("backend", "backend_on_device", "cpu_backend")
                 if key in params), None)


def pytest_collection_modifyitems(config, items) -> None:
    keep, drop = [], []
    for item in items:
        (drop if backend_pair(item) in SKIPPED_BACKENDS else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
