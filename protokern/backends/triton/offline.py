"""Compiling protokern's Triton kernels for a GPU target without a GPU, to read what the
compiled form costs: registers, spills, shared memory, and which instructions the GEMM uses
(``wgmma`` on sm_90, ``mma.sync`` on sm_80, ``cp.async`` loads).

    python -m protokern.backends.triton.offline --out benchmarks/results/triton-compile-report.md

Triton compiles for a `GPUTarget` with no device present; the register and spill counts come
from ``cuobjdump -res-usage`` on the cubin (the cuobjdump that Triton ships). What runs here
is the kernels' default configurations (`CONFIGS` of each module) on the shapes the GPU
benchmarks use, so a spilling default cannot land (tests/backends/test_triton_offline.py).
"""

import argparse
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

TARGETS = {"sm_90": 90, "sm_80": 80}


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


def compile_kernel(fn, signature: dict, constants: dict, num_warps: int, num_stages: int,
                   target: str):
    """``fn`` (a `triton.JITFunction`) compiled for ``target`` (``"sm_90"``, ``"sm_80"``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn, {**signature, **{name: "constexpr" for name in constants}},
                       constants)
    return triton.compile(source, target=GPUTarget("cuda", TARGETS[target], 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def describe(kernel: str, specialization: str, compiled, config: str, target: str) -> Compiled:
    registers, stack = _resources(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return Compiled(kernel, specialization, config, target, registers, stack,
                    compiled.metadata.shared, "wgmma" in ptx, "mma.sync" in ptx,
                    "cp.async" in ptx)


def _signature(fn, pointer_types: dict[str, str], floats: tuple[str, ...] = ()) -> dict:
    """Triton types of ``fn``'s runtime arguments: pointers as given, ``floats`` fp32, integers
    int32 (as the launcher specialises sizes and strides below 2**31)."""
    types = {}
    for name in fn.arg_names:
        if name.isupper() and name not in floats and name not in ("B", "M", "L", "K", "N",
                                                                  "OUT_W", "PH", "PW", "D",
                                                                  "H", "W", "OUT_H"):
            continue  # a constexpr
        if name in pointer_types:
            types[name] = pointer_types[name]
        elif name in floats:
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


# (name, dtype of x and prototypes, dot precision) of the GPU benchmarks
SPECIALIZATIONS = [("float32", "*fp32", "ieee"), ("tf32", "*fp32", "tf32"),
                   ("bfloat16", "*bf16", "ieee")]
POSITIONS = (49, 196, 1)  # cub / imagenet, cub14, cil_vectors


def min_distance_reports(target: str) -> list[Compiled]:
    """Every default configuration of `_choose_kernel` for every specialization and L."""
    import triton
    import triton.language as tl

    from protokern.backends.triton import launch
    from protokern.backends.triton import min_distance as module

    fn = module._choose_kernel.kernel.fn
    reports = []
    for name, pointer, precision in SPECIALIZATIONS:
        for metric in ("sqeuclidean", "cosine"):
            for positions in POSITIONS:
                for config in module.CONFIGS:
                    meta = {**config.kwargs, "L": positions}
                    meta["BLOCK_L"] = launch.positions_per_tile_image(meta)
                    meta["IMAGES"] = launch.images_per_tile(meta)
                    constants = {"METRIC": metric, "PRECISION": precision, "ACC": tl.float32,
                                 **{k: meta[k] for k in ("BLOCK_ROWS", "BLOCK_M", "BLOCK_K",
                                                         "BLOCK_L", "IMAGES")}}
                    signature = _signature(fn, {"x_ptr": pointer, "p_ptr": pointer,
                                                "indices_ptr": "*i64"}, ("GROWTH", "FLOOR"))
                    compiled = compile_kernel(fn, signature, constants, config.num_warps,
                                              config.num_stages, target)
                    label = (f"{config.kwargs['BLOCK_ROWS']}x{config.kwargs['BLOCK_M']}x"
                             f"{config.kwargs['BLOCK_K']} w{config.num_warps} "
                             f"s{config.num_stages}")
                    reports.append(describe("min_distance._choose_kernel",
                                            f"{name} {metric} L={positions}", compiled, label,
                                            target))
    del triton
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the Markdown report here")
    parser.add_argument("--targets", default="sm_90,sm_80", help="comma-separated targets")
    args = parser.parse_args()
    from protokern.backends import triton as backend

    if backend.INTERPRET:
        parser.error("run without TRITON_INTERPRET: the kernels are compiled for a GPU here")
    rows = []
    for target in args.targets.split(","):
        rows += min_distance_reports(target)
    header = ("| kernel | specialization | config (rows x M x K, warps, stages) | target | "
              "registers | spill/stack bytes | shared bytes | instructions |\n"
              "|---|---|---|---|---|---|---|---|")
    text = header + "\n" + "\n".join(r.row() for r in rows) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
