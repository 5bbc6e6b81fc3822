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
    op: str = "min_distance"
    """``"min_distance"`` (min over positions, outputs ``(B, M)``) or ``"nearest_prototypes"``
    (the ``k`` nearest prototypes of every window, outputs ``(B, L', k)``)."""
    k: int = 1

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The shape of the op's values (and of the gradient a backward pass receives)."""
        if self.op == "nearest_prototypes":
            return (self.batch, self.positions, self.k)
        return (self.batch, self.num_prototypes)

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
        nearest = f", {self.k} nearest" if self.op == "nearest_prototypes" else ""
        return (f"B={self.batch} D={self.dim} {self.height}x{self.width} "
                f"M={self.num_prototypes}{patch}{nearest}")


SHAPES: dict[str, NamedShape] = {
    s.name: s
    for s in (
        NamedShape("cub", 64, 128, 7, 7, 2000, note="ProtoPNet on CUB-200: 10 x 200 classes"),
        NamedShape("cub14", 32, 512, 14, 14, 2000),
        NamedShape("imagenet", 64, 256, 7, 7, 10000),
        NamedShape("large_bank", 32, 256, 14, 14, 50000),
        NamedShape("cil_vectors", 1024, 768, 1, 1, 10000, note="class-incremental head, tokens"),
        # the reduction over prototypes (DESIGN §6): N queries, D, M, k
        NamedShape("vq", 32, 256, 1024, 1, 16384, op="nearest_prototypes",
                   note="a VQ codebook: 32 x 1024 tokens"),
        NamedShape("patchcore", 8, 1024, 28, 28, 16384, op="nearest_prototypes",
                   note="a PatchCore memory bank, k = 1"),
        NamedShape("patchcore_k9", 8, 1024, 28, 28, 16384, op="nearest_prototypes", k=9,
                   note="a PatchCore memory bank, k = 9 (reweighting)"),
        NamedShape("kmeans", 100000, 128, 1, 1, 1024, op="nearest_prototypes",
                   note="a k-means assignment step"),
        # tiny shapes: tests and smoke runs
        NamedShape("tiny", 4, 16, 5, 5, 40),
        NamedShape("tiny_patch", 3, 8, 6, 5, 24, patch=2),
        NamedShape("tiny_vectors", 32, 24, 1, 1, 50),
        NamedShape("tiny_nearest", 4, 16, 5, 5, 60, op="nearest_prototypes", k=3),
    )
}
"""The named shapes of DESIGN §6, plus tiny ones for tests."""

GPU_SHAPES = ("cub", "imagenet", "large_bank", "cil_vectors")
"""What `benchmarks/gpu_check.sh` runs."""

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
