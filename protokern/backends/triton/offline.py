"""Compiling protokern's Triton kernels for a GPU target without a GPU, to read what the
compiled form costs: registers, spills, shared memory, and which instructions the GEMM uses
(``wgmma`` on sm_90, ``mma.sync`` on sm_80, ``cp.async`` loads).

    env -u TRITON_INTERPRET python -m protokern.backends.triton.offline \\
        --out benchmarks/results/triton-compile-report.md

Triton compiles for a `GPUTarget` with no device present; the register and spill counts come
from ``cuobjdump -res-usage`` on the cubin (the cuobjdump that Triton ships). What runs here is
every default configuration of `_choose_kernel` (`min_distance.configs_for` each shape's L,
dot kind and target), and the fixed one of `_exact_kernel`, on the GPU benchmarks' shapes
(`SHAPES`), specialised as the launcher would for those arguments (the channels_last rows
`launch.contiguous_entries` makes, 16-aligned pointers, ``tt.divisibility`` 16 on every integer
that is a multiple of 16). Then `nearest_prototypes`' `_nearest_kernel` in every default
configuration (`nearest_prototypes.configs_for` each k, dot and target) and its `_search_kernel`,
on `NEAREST_SHAPES` for `NEAREST_K`. tests/backends/test_triton_offline.py compiles a subset in
CI (every distinct default configuration once) and fails on a spill.
"""

import argparse
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

TARGETS = {"sm_90": 90, "sm_80": 80}


@dataclass(frozen=True)
class Shape:
    """A benchmark shape with 1x1 prototypes: ``x`` ``(B, D, H, W)``, ``M`` prototypes."""

    name: str
    batch: int
    dim: int
    height: int
    width: int
    num: int

    def arguments(self) -> dict[str, int]:
        """The integer arguments of `_choose_kernel` / `_exact_kernel` for this shape, with x
        as channels_last rows and prototypes ``(M, D, 1, 1)`` contiguous."""
        length = self.height * self.width
        return {"B": self.batch, "M": self.num, "L": length, "K": self.dim, "OUT_W": self.width,
                "PH": 1, "PW": 1, "sxb": length * self.dim, "sxd": 1,
                "sxh": self.width * self.dim, "sxw": self.dim, "spm": self.dim, "spd": 1,
                "sph": self.dim, "spw": self.dim}


SHAPES = [Shape("cub", 64, 128, 7, 7, 2000), Shape("imagenet", 64, 256, 7, 7, 10000),
          Shape("large_bank", 32, 256, 14, 14, 50000), Shape("cil_vectors", 1024, 768, 1, 1, 10000)]
"""`protokern.bench.shapes`' GPU shapes (L = 49, 49, 196, 1)."""

# (name, Triton type of x and prototypes, dot precision of L > 1, of L = 1)
SPECIALIZATIONS = [("float32", "fp32", "ieee", "ieee"), ("tf32", "fp32", "tf32", "tf32x3"),
                   ("bfloat16", "bf16", "ieee", "ieee")]
METRICS = ("sqeuclidean", "cosine")


@dataclass(frozen=True)
class Compiled:
    kernel: str
    specialization: str
    config: str
    target: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    wgmma: bool
    mma_sync: bool
    cp_async: bool

    def row(self) -> str:
        flags = ", ".join(name for name, used in (("wgmma", self.wgmma),
                                                 ("mma.sync", self.mma_sync),
                                                 ("cp.async", self.cp_async)) if used) or "-"
        return (f"| {self.kernel} | {self.specialization} | {self.config} | {self.target} | "
                f"{self.registers} | {self.spill_bytes} | {self.shared_bytes} | {flags} |")


def tool_missing() -> str | None:
    """Why the offline compile cannot run here (no triton, or its bundled cuobjdump/ptxas are
    missing), or None."""
    try:
        import triton
    except Exception as error:
        return f"triton is not importable ({type(error).__name__}: {error})"
    binaries = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for tool in ("cuobjdump", "ptxas"):
        if not (binaries / tool).exists():
            return f"Triton's bundled {tool} is missing ({binaries / tool})"
    return None


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _resources(cubin: bytes) -> tuple[int, int]:
    """``(registers, stack bytes)`` of the cubin's one function (stack: spills, local arrays)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([_cuobjdump(), "-res-usage", file.name], check=True,
                                capture_output=True, text=True).stdout
    registers = int(re.search(r"REG:(\d+)", report).group(1))
    stack = int(re.search(r"STACK:(\d+)", report).group(1))
    return registers, stack


def compile_kernel(fn, arguments: dict, constants: dict, num_warps: int, num_stages: int,
                   target: str):
    """``fn`` (a `triton.JITFunction`) compiled for ``target`` (``"sm_90"``, ``"sm_80"``).

    ``arguments``: every runtime argument by name, a Triton pointer type (``"*bf16"``) or an
    example value (int: ``i32``, float: ``fp32``); as the launcher does, pointers and integers
    that are multiples of 16 get ``tt.divisibility`` 16 (torch's allocations are 16-aligned)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
            continue
        value = arguments[name]
        if isinstance(value, str):
            signature[name] = value
            aligned = True
        elif isinstance(value, float):
            signature[name] = "fp32"
            aligned = False
        else:
            signature[name] = "i32"
            aligned = value % 16 == 0
        if aligned:
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constants, attrs)
    return triton.compile(source, target=GPUTarget("cuda", TARGETS[target], 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def describe(kernel: str, specialization: str, compiled, config: str, target: str) -> Compiled:
    registers, stack = _resources(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return Compiled(kernel, specialization, config, target, registers, stack,
                    compiled.metadata.shared, "wgmma" in ptx, "mma.sync" in ptx,
                    "cp.async" in ptx)


def _label(config) -> str:
    kwargs = config.kwargs
    return (f"{kwargs['BLOCK_ROWS']}x{kwargs['BLOCK_M']}x{kwargs['BLOCK_K']} "
            f"w{config.num_warps} s{config.num_stages}")


def dot_of(shape: Shape, specialization: tuple) -> str:
    """`launch.dot_kind` of ``specialization`` on ``shape`` (its L picks the precision)."""
    from protokern.backends.triton import launch

    _, element, precision, single = specialization
    length = shape.arguments()["L"]
    return launch.dot_kind(16 if element in ("bf16", "fp16") else 32,
                           single if length == 1 else precision)


def default_configs(shape: Shape, specialization: tuple, target: str) -> list:
    """The configurations `_choose_kernel` may run with on ``shape`` in ``specialization``
    on a GPU of ``target`` (`min_distance.configs_for`)."""
    from protokern.backends.triton import min_distance as module

    return module.configs_for(shape.arguments()["L"], dot_of(shape, specialization), target)


def choose_kernel_report(shape: Shape, specialization: tuple, metric: str, config,
                         target: str) -> Compiled:
    """`_choose_kernel` with ``config`` on ``shape``, as `min_distance.min_distance` launches
    it."""
    import triton.language as tl

    from protokern.backends.triton import launch
    from protokern.backends.triton import min_distance as module

    name, element, precision, single = specialization
    arguments = shape.arguments()
    precision = single if arguments["L"] == 1 else precision
    meta = {**config.kwargs, "L": arguments["L"]}
    meta["BLOCK_L"] = launch.positions_per_tile_image(meta)
    meta["IMAGES"] = launch.images_per_tile(meta)
    constants = {"CONTIGUOUS": True, "METRIC": metric, "PRECISION": precision,
                 "VALUES": precision != "tf32", "ACC": tl.float32,
                 "HUGE": 3.4028234663852886e38 / 8,
                 **{k: meta[k] for k in ("BLOCK_ROWS", "BLOCK_M", "BLOCK_K", "BLOCK_L",
                                         "IMAGES")}}
    pointers = {"x_ptr": f"*{element}", "p_ptr": f"*{element}", "values_ptr": f"*{element}",
                "indices_ptr": "*i64"}
    compiled = compile_kernel(module._choose_kernel.kernel.fn,
                              {**arguments, **pointers, "GROWTH": 1e-5, "FLOOR": 1e-35},
                              constants, config.num_warps, config.num_stages, target)
    return describe("min_distance._choose_kernel",
                    f"{shape.name} L={arguments['L']} {name} ({precision}) {metric}",
                    compiled, _label(config), target)


def exact_kernel_report(shape: Shape, specialization: tuple, metric: str,
                        target: str) -> Compiled:
    """`_exact_kernel` (one fixed configuration) on ``shape``."""
    import triton.language as tl

    from protokern.backends.triton import min_distance as module

    name, element, _, _ = specialization
    config = module.EXACT
    arguments = {k: v for k, v in shape.arguments().items() if k != "B"}
    pointers = {"x_ptr": f"*{element}", "p_ptr": f"*{element}", "values_ptr": f"*{element}",
                "indices_ptr": "*i64"}
    constants = {"CONTIGUOUS": True, "METRIC": metric, "ACC": tl.float32, **config.kwargs}
    compiled = compile_kernel(module._exact_kernel, {**arguments, **pointers}, constants,
                              config.num_warps, config.num_stages, target)
    label = f"M {config.kwargs['BLOCK_M']} K {config.kwargs['BLOCK_K']} w{config.num_warps}"
    return describe("min_distance._exact_kernel", f"{shape.name} {name} {metric}", compiled,
                    label, target)


def topk_kernel_report(shape: Shape, specialization: tuple, metric: str, config, k: int,
                       target: str) -> Compiled:
    """`topk_distance._topk_kernel` with ``config`` on ``shape`` for ``k``, as
    `topk_distance.topk_distance` launches it (``shape``'s L must be above 1)."""
    import triton.language as tl

    from protokern.backends.triton import selection
    from protokern.backends.triton import topk_distance as module

    name, element, precision, _ = specialization
    arguments = {key: value for key, value in shape.arguments().items() if key != "B"}
    meta = {**config.kwargs, "L": arguments["L"]}
    constants = {"CONTIGUOUS": True, "METRIC": metric, "PRECISION": precision,
                 "ACC": tl.float32, "HUGE": 3.4028234663852886e38 / 8, "K_SMALLEST": k,
                 "SLOTS": selection.slots_for(k), "BLOCK_L": module.positions_per_tile(meta),
                 **{key: meta[key] for key in ("BLOCK_ROWS", "BLOCK_M", "BLOCK_K")}}
    pointers = {"x_ptr": f"*{element}", "p_ptr": f"*{element}", "values_ptr": f"*{element}",
                "indices_ptr": "*i64", "searched_ptr": "*i8"}
    compiled = compile_kernel(module._topk_kernel.kernel.fn,
                              {**arguments, **pointers, "GROWTH": 1e-5, "FLOOR": 1e-35},
                              constants, config.num_warps, config.num_stages, target)
    return describe("topk_distance._topk_kernel",
                    f"{shape.name} L={arguments['L']} {name} ({precision}) {metric} k={k}",
                    compiled, _label(config), target)


NEAREST_SHAPES = [Shape("vq", 32, 256, 1024, 1, 16384), Shape("patchcore", 8, 1024, 28, 28, 16384)]
"""`protokern.bench.shapes`' GPU shapes of `nearest_prototypes` (a VQ codebook over 32 x 1024
tokens, D = 256; a PatchCore bank over 8 images' 28 x 28 patches, D = 1024)."""

NEAREST_K = (1, 9, 31, 63, 64)
"""The ``k`` the report compiles `nearest_prototypes`' kernels for: the benchmarks', the
largest of each band of k below the top (`nearest_prototypes.BANDS`: the most slots and
selection rounds) and the largest the backend takes (`protokern.backends.triton.MAX_K`)."""


def nearest_kernel_report(shape: Shape, specialization: tuple, metric: str, config, k: int,
                          target: str) -> Compiled:
    """`nearest_prototypes._nearest_kernel` with ``config`` on ``shape`` for ``k``, as
    `nearest_prototypes.nearest_prototypes` launches it (its rows: every window of every
    image); ``config`` None: its direct `_search_kernel` (one fixed configuration per band of
    k, `search_config`)."""
    import triton.language as tl

    from protokern.backends.triton import nearest_prototypes as module
    from protokern.backends.triton import selection

    name, element, precision, _ = specialization
    arguments = shape.arguments()
    arguments = {"N": arguments.pop("B") * arguments["L"], **arguments}
    constants = {"CONTIGUOUS": True, "METRIC": metric, "ACC": tl.float32, "K_NEAREST": k,
                 "SLOTS": selection.slots_for(k)}
    pointers = {"x_ptr": f"*{element}", "p_ptr": f"*{element}", "values_ptr": f"*{element}",
                "indices_ptr": "*i64", "searched_ptr": "*i8"}
    if config is None:
        kernel, config, label = module._search_kernel, module.search_config(k, target), "search"
    else:
        kernel, label = module._nearest_kernel.kernel, "nearest"
        constants.update(PRECISION=precision, HUGE=3.4028234663852886e38 / 8)
        arguments.update(GROWTH=1e-5, FLOOR=1e-35)
    compiled = compile_kernel(kernel, {**arguments, **pointers},
                              {**constants, **config.kwargs}, config.num_warps,
                              config.num_stages, target)
    return describe(f"nearest_prototypes._{label}_kernel",
                    f"{shape.name} N={arguments['N']} {name} ({precision}) {metric} k={k}",
                    compiled, _label(config), target)


def nearest_configs(specialization: tuple, k: int, target: str) -> list:
    """The configurations `_nearest_kernel` may run with for ``k`` in ``specialization`` on a
    GPU of ``target`` (`nearest_prototypes.configs_for`; no ``tf32x3`` there)."""
    from protokern.backends.triton import launch
    from protokern.backends.triton import nearest_prototypes as module

    _, element, precision, _ = specialization
    dot = launch.dot_kind(16 if element in ("bf16", "fp16") else 32, precision)
    return module.configs_for(k, dot, target)


def nearest_reports(targets: list[str], shapes: list[Shape] = NEAREST_SHAPES,
                    ks: tuple[int, ...] = NEAREST_K,
                    specializations: list[tuple] = SPECIALIZATIONS,
                    metrics: tuple[str, ...] = METRICS) -> list[Compiled]:
    """`nearest_kernel_report` of every configuration `_nearest_kernel` may run with
    (`nearest_configs`), and of `_search_kernel`, for every target, shape, k, specialization
    and metric asked for."""
    plan = [(t, s, spec, metric, config, k) for t in targets for s in shapes for k in ks
            for spec in specializations for metric in metrics
            for config in nearest_configs(spec, k, t) + [None]]
    return [nearest_kernel_report(shape, spec, metric, config, k, target)
            for target, shape, spec, metric, config, k
            in tqdm(plan, desc="compile nearest", unit="kernel")]


def reports(targets: list[str], shapes: list[Shape] = SHAPES,
            specializations: list[tuple] = SPECIALIZATIONS,
            metrics: tuple[str, ...] = METRICS, exact: bool = True) -> list[Compiled]:
    """Every configuration `_choose_kernel` may run with (`default_configs`: the shape's L,
    the dot and the target's; and `_exact_kernel`'s, if ``exact``) for every target, shape,
    specialization and metric asked for."""
    plan = [(t, s, spec, metric, config) for t in targets for s in shapes
            for spec in specializations for metric in metrics
            for config in default_configs(s, spec, t) + ([None] if exact else [])]
    rows = []
    for target, shape, spec, metric, config in tqdm(plan, desc="compile", unit="kernel"):
        if config is None:
            rows.append(exact_kernel_report(shape, spec, metric, target))
        else:
            rows.append(choose_kernel_report(shape, spec, metric, config, target))
    return rows


def each_config_once(targets: list[str]) -> list[tuple]:
    """``(target, shape, specialization, metric, config)``: every distinct default
    configuration of `_choose_kernel` compiled once per target, dot kind and kind of L (maps,
    L = 1), the subset CI compiles (tests/backends/test_triton_offline.py). Along each list the
    map shape and the metric rotate, so that both metrics, L = 49 (128-row tiles hold two
    images: the reduction's 3-D path) and L = 196 are among them."""
    maps = [s for s in SHAPES if s.name in ("cub", "large_bank")]
    single = [s for s in SHAPES if s.arguments()["L"] == 1]
    plan = []
    for target in targets:
        for n, spec in enumerate(SPECIALIZATIONS):
            for shapes in (maps, single):
                for i, config in enumerate(default_configs(shapes[0], spec, target)):
                    plan.append((target, shapes[i % len(shapes)], spec,
                                 METRICS[(i + n) % len(METRICS)], config))
    return plan


def nearest_each_config_once(targets: list[str]) -> list[tuple]:
    """``(target, specialization, config, k)``: every distinct default configuration of
    `_nearest_kernel` per target and band of k (`nearest_prototypes.configs_for`), with the
    first specialization whose list holds it, and `_search_kernel`'s (config None) per target
    and band, each at the band's largest k (the most slots and selection rounds): the subset
    CI compiles, on `NEAREST_SHAPES`' first (tests/backends/test_triton_offline.py)."""
    from protokern.backends import triton as backend
    from protokern.backends.triton import nearest_prototypes as module

    plan = []
    for target in targets:
        for band in module.BANDS:
            k = max(k for k in range(1, backend.MAX_K + 1) if module.band_of(k) == band)
            seen = set()
            for spec in SPECIALIZATIONS:
                for config in nearest_configs(spec, k, target):
                    if id(config) not in seen:
                        seen.add(id(config))
                        plan.append((target, spec, config, k))
            plan.append((target, SPECIALIZATIONS[0], None, k))
    return plan


HEADER = ("| kernel | specialization | config | target | registers | spill/stack bytes | "
          "shared bytes | instructions |\n|---|---|---|---|---|---|---|---|")


REPORT = "benchmarks/results/triton-compile-report.md"
"""Where the committed report (CI's Triton) lives; the command line in its header."""


def markdown(rows: list[Compiled], triton_version: str, out: str = REPORT) -> str:
    """The report: a title naming the Triton that compiled, the command that wrote it to
    ``out``, and one table row per compiled kernel."""
    spilling = [r for r in rows if r.spill_bytes]
    return (f"# Triton kernels compiled offline (triton {triton_version})\n\n"
            f"Generated by `env -u TRITON_INTERPRET python -m protokern.backends.triton.offline "
            f"--out {out}`; config: rows x prototypes x "
            f"entries, warps, stages. {len(rows)} kernels, {len(spilling)} with spills or "
            f"stack.\n\n{HEADER}\n" + "\n".join(r.row() for r in rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the Markdown report here")
    parser.add_argument("--targets", default="sm_90,sm_80", help="comma-separated targets")
    args = parser.parse_args()
    from protokern.backends import triton as backend

    if backend.INTERPRET:
        parser.error("run without TRITON_INTERPRET: the kernels are compiled for a GPU here")
    missing = tool_missing()
    if missing:
        parser.error(missing)
    import triton

    targets = args.targets.split(",")
    text = markdown(reports(targets) + nearest_reports(targets), triton.__version__,
                    args.out or REPORT)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
