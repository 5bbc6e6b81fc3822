"""Every environment variable protokern reads, in one table, parsed by one set of helpers.

A flag is on for ``1``, ``true``, ``yes`` or ``on`` and off for ``0``, ``false``, ``no``, ``off``
or empty (any case); any other value is a ValueError naming the variable, never a silent
guess. This module imports nothing but the standard library, so ``setup.py`` can read it
before torch is installed.
"""

import os

VARIABLES: dict[str, str] = {
    "PROTOKERN_BACKEND": "backend for every op unless `use_backend`/`set_backend` choose one "
                         "(a name from `pk.available_backends()`)",
    "TRITON_INTERPRET": "flag (Triton's own): run Triton kernels in its interpreter, on CPU "
                        "tensors; the tests set it where no GPU is visible",
    "PROTOKERN_NO_EXT": "flag, at install: skip the C++/CUDA extension (pure Python, "
                        "`reference` only)",
    "PROTOKERN_REQUIRE_EXT": "flag, at install: a failed extension build is an error instead "
                             "of a pure-Python install (CI sets it)",
    "PROTOKERN_BIG_TESTS": "flag, tests: also run the tests that need gigabytes or minutes "
                           "(limits past 2^31, the soak test)",
    "PROTOKERN_FUZZ": "tests: `long` runs the fuzzer's long profile (thousands of examples)",
    "PROTOKERN_FUZZ_EXAMPLES": "integer, tests: examples per fuzzed backend",
    "PROTOKERN_BENCH_DEVICE": "`pytest benchmarks`: cpu or cuda (default: cuda when visible)",
    "PROTOKERN_BENCH_SHAPES": "`pytest benchmarks`: comma-separated named shapes",
    "PROTOKERN_BENCH_DTYPE": "`pytest benchmarks`: float32, bfloat16 or float16",
    "PROTOKERN_BENCH_TF32": "flag, `pytest benchmarks`: let CUDA float32 matmuls use TF32",
    "PROTOKERN_BENCH_THREADS": "integer, `pytest benchmarks`: CPU threads (default 2)",
    "PROTOKERN_BENCH_ROUNDS": "integer, `pytest benchmarks`: timed rounds per case",
    "PROTOKERN_BENCH_MEMORY": "flag, `pytest benchmarks`: measure peak memory (default on)",
    "PROTOKERN_BENCH_MEMORY_CAP_GB": "number, `pytest benchmarks`: skip cases estimated to "
                                     "need more memory",
    "PROTOKERN_BENCH_EXCLUDE": "`pytest benchmarks`: comma-separated contenders or kinds to "
                               "leave out",
}
"""Name -> what it does. The README's table lists exactly these (tests/test_project.py)."""

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _known(name: str) -> str:
    if name not in VARIABLES:
        raise KeyError(f"protokern.env: {name} is not in protokern.env.VARIABLES")
    return os.environ.get(name, "").strip()


def text(name: str, default: str = "") -> str:
    """The variable's value, or ``default`` when unset or empty."""
    return _known(name) or default


def flag(name: str, default: bool = False) -> bool:
    """The variable as a flag; ``default`` when unset."""
    if name not in os.environ:
        _known(name)
        return default
    value = _known(name).lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={os.environ[name]!r} is not a flag: use one "
                     f"of {', '.join(_TRUE)} (on) or {', '.join(v for v in _FALSE if v)} (off)")


def integer(name: str, default: int) -> int:
    """The variable as an integer; ``default`` when unset or empty."""
    value = _known(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def number(name: str, default: float | None = None) -> float | None:
    """The variable as a float; ``default`` when unset or empty."""
    value = _known(name)
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be a number") from None


def backend() -> str:
    """``PROTOKERN_BACKEND``: the backend named by the environment, or ``""``."""
    return text("PROTOKERN_BACKEND")
