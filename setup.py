"""Build protokern's optional native extension `protokern._C` from whatever `csrc/` holds.

Sources, by convention (DESIGN.md §3-§4):
  csrc/*.cpp, csrc/cpu/*.cpp      always (C++ CPU kernels and the bindings)
  csrc/cuda/*.cu, csrc/cuda/*.cpp  only where PyTorch has CUDA and nvcc is found (WITH_CUDA defined)

Environment (protokern's variables are flags parsed by `protokern/env.py`, as everywhere else:
1/true/yes/on or 0/false/no/off, anything else an error):
  PROTOKERN_NO_EXT=1       build no extension (pure-Python install)
  PROTOKERN_REQUIRE_EXT=1  a failed extension build fails the install (CI sets it)
  TORCH_CUDA_ARCH_LIST     PyTorch's own: CUDA architectures (default: the visible GPU, else
                           "8.0;9.0")

The extension is built against the installed torch, so install with
`pip install --no-build-isolation ...`. Where torch cannot be imported at build time, or no
source exists, or compilation fails (and PROTOKERN_REQUIRE_EXT is unset), the package installs
without it and every op runs on the pure-PyTorch `reference` backend.
"""

import glob
import importlib.util
import os
import sys
from types import ModuleType

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_env() -> ModuleType:
    """`protokern/env.py`, loaded by its path: importing the `protokern` package would import
    torch, which need not be installed when setup.py runs (env.py needs only the standard
    library)."""
    path = os.path.join(ROOT, "protokern", "env.py")
    spec = importlib.util.spec_from_file_location("_protokern_setup_env", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


env = _load_env()


def _say(message: str) -> None:
    print(f"protokern setup: {message}", file=sys.stderr)


def _sources(*patterns: str) -> list[str]:
    found: list[str] = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join("csrc", pattern), root_dir=ROOT))
    return found


def _extension_build() -> dict:
    """Return the `ext_modules`/`cmdclass` arguments of setup(), empty for a pure-Python build."""
    if env.flag("PROTOKERN_NO_EXT"):
        _say("PROTOKERN_NO_EXT is set: no extension, pure-Python install")
        return {}
    cpu_sources = _sources("*.cpp", "cpu/*.cpp")
    cuda_sources = _sources("cuda/*.cu", "cuda/*.cpp")
    if not cpu_sources and not cuda_sources:
        _say("csrc/ holds no kernel sources yet: pure-Python install")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not importable at build time (use pip --no-build-isolation): "
             "pure-Python install")
        return {}

    with_cuda = bool(cuda_sources) and torch.version.cuda is not None \
        and cpp_extension.CUDA_HOME is not None
    if cuda_sources and not with_cuda:
        _say("PyTorch without CUDA or no nvcc found: skipping the CUDA kernels")
    if with_cuda and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # PyTorch 2.13 headers need C++20. -ffp-contract=off: no fused multiply-adds where the source
    # has a product and a sum, so the AVX-512, AVX2 and baseline clones of a kernel round alike
    # (an FMA in one clone's exact sums and not in another's made the cosine distance of a copy
    # an ulp above 0 in float64; the GEMM is BLAS's and keeps its own).
    compile_args: dict[str, list[str]] = {
        "cxx": ["-O3", "-std=c++20", "-ffp-contract=off", *openmp]}
    kind = cpp_extension.CppExtension
    sources = cpu_sources
    macros: list[tuple[str, str | None]] = []
    if with_cuda:
        kind = cpp_extension.CUDAExtension
        sources = cpu_sources + cuda_sources
        macros.append(("WITH_CUDA", None))
        # No --use_fast_math: the kernels' exact recompute, NaN and inf handling rely on IEEE
        # division and square root. C++20 like the cxx flags (PyTorch's default).
        compile_args["nvcc"] = ["-O3", "-std=c++20"]

    extension = kind(
        name="protokern._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args=compile_args,
        extra_link_args=openmp,
    )
    require = env.flag("PROTOKERN_REQUIRE_EXT")

    class BuildOptionalExtension(cpp_extension.BuildExtension):
        """Falls back to the CPU kernels alone when the CUDA part fails to compile, and to the
        pure-Python package when the CPU part fails too, unless the extension is required."""

        def build_extensions(self):
            try:
                super().build_extensions()
                return
            except Exception as error:  # compiler and ninja failures have no common type
                if require:
                    raise
                if not with_cuda:
                    self._give_up(error)
                    return
                _say(f"WARNING: building the CUDA kernels failed ({error}); building the CPU "
                     "kernels alone (CUDA tensors will use triton or reference)")
            extension.sources = list(cpu_sources)
            extension.define_macros = []
            extension.extra_compile_args = {"cxx": compile_args["cxx"]}
            try:
                super().build_extensions()
            except Exception as error:  # noqa: BLE001 -- reported, then the pure-Python install
                self._give_up(error)

        def _give_up(self, error: Exception) -> None:
            _say(f"WARNING: building protokern._C failed ({error}); installing without "
                 "it. Set PROTOKERN_REQUIRE_EXT=1 to make this an error.")
            self.extensions = []  # so no later step looks for the missing library

    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildOptionalExtension}}


setup(**_extension_build())
