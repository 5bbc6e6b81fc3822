"""Named benchmark shapes (DESIGN §6) and the GEMM floor of each: FLOPs and bytes.

Every contender computes, for ``x`` ``(B, D, H, W)`` and prototypes ``(M, D, ph, pw)``, the
``B x L' x M`` patch-to-prototype distances (``L' = (H - ph + 1)(W - pw + 1)``,
``K = D * ph * pw``) and keeps the minimum over ``L'``. Its unavoidable work is the GEMM
``(B L') x K  @  K x M``: ``2 B L' M K`` FLOPs. A fused kernel must read ``x`` and the
prototypes and write ``(B, M)`` values and int64 indices; a naive one also writes (and reads
back) the ``(B, M, L')`` distance tensor.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NamedShape:
    """One benchmark problem: ``x`` ``(batch, dim, height, width)``, prototypes
    ``(num_prototypes, dim, patch, patch)``."""

    name: str
    batch: int
    dim: int
    height: int
    width: int
    num_prototypes: int
    patch: int = 1
    note: str = ""

    @property
    def positions(self) -> int:
        """``L'``: valid stride-1 windows per image."""
        return (self.height - self.patch + 1) * (self.width - self.patch + 1)

    @property
    def row_size(self) -> int:
        """``K = D * ph * pw``: the GEMM's inner dimension."""
        return self.dim * self.patch * self.patch

    @property
    def distances(self) -> int:
        """``B * M * L'``: entries of the full distance tensor a naive contender materialises."""
        return self.batch * self.num_prototypes * self.positions

    def gemm_flops(self) -> int:
        """``2 B L' M K``: the multiply-adds of the GEMM at the heart of every contender."""
        return 2 * self.batch * self.positions * self.num_prototypes * self.row_size

    def input_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of ``x`` and the prototypes."""
        size = torch.empty((), dtype=dtype).element_size()
        x = self.batch * self.dim * self.height * self.width
        return size * (x + self.num_prototypes * self.row_size)

    def with_prototypes(self, num_prototypes: int) -> "NamedShape":
        """The same problem with another ``M`` (the scaling sweep)."""
        return NamedShape(f"{self.name}@M={num_prototypes}", self.batch, self.dim, self.height,
                          self.width, num_prototypes, self.patch, self.note)

    def describe(self) -> str:
        patch = f", {self.patch}x{self.patch} patches" if self.patch > 1 else ""
        return (f"B={self.batch} D={self.dim} {self.height}x{self.width} "
                f"M={self.num_prototypes}{patch}")


SHAPES: dict[str, NamedShape] = {
    s.name: s
    for s in (
        NamedShape("cub", 64, 128, 7, 7, 2000, note="ProtoPNet on CUB-200: 10 x 200 classes"),
        NamedShape("cub14", 32, 512, 14, 14, 2000),
        NamedShape("imagenet", 64, 256, 7, 7, 10000),
        NamedShape("large_bank", 32, 256, 14, 14, 50000),
        NamedShape("cil_vectors", 1024, 768, 1, 1, 10000, note="class-incremental head, tokens"),
        # tiny shapes: tests and smoke runs
        NamedShape("tiny", 4, 16, 5, 5, 40),
        NamedShape("tiny_patch", 3, 8, 6, 5, 24, patch=2),
        NamedShape("tiny_vectors", 32, 24, 1, 1, 50),
    )
}
"""The named shapes of DESIGN §6, plus tiny ones for tests."""

GPU_SHAPES = ("cub", "imagenet", "large_bank", "cil_vectors")
"""What `benchmarks/run_gpu.sh` runs."""

CPU_SHAPES = ("cub", "cub14", "imagenet", "cil_vectors")
"""The default on CPU: ``large_bank``'s naive contenders are estimated (`Contender.estimate_bytes`)
to need ~8 GB, and its GEMM is ~160 GFLOP."""


def parse_shapes(names: str | list[str]) -> list[NamedShape]:
    """Named shapes from ``"cub,imagenet"`` or a list of names; ValueError on an unknown one."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    if not names:
        raise ValueError("no shapes given")
    return [SHAPES[n] for n in names]
