"""Launch helpers shared by the kernels: configurations, accumulation dtype, TF32, device."""

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from protokern.backends import reference
from protokern.backends.triton import INTERPRET


class Fixed:
    """A kernel launched with one configuration: ``Fixed(kernel, config)[grid](*args)``."""

    def __init__(self, kernel, config: triton.Config):
        self.kernel = kernel
        self.config = config

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, **kwargs, **self.config.all_kwargs())


def fixed_config(gpu: dict, interpreted: dict, num_warps: int = 4) -> triton.Config:
    """The one configuration of an untuned kernel: ``interpreted`` (wider blocks: the
    interpreter's cost is per operation and program, not per element) or ``gpu``."""
    return triton.Config(interpreted if INTERPRET else gpu, num_warps=num_warps)


class Tuned:
    """An autotuned kernel that, under ``torch.use_deterministic_algorithms(True)``, always
    launches its first configuration instead (`first`: the first of those its pruning keeps for
    the call): which configuration the autotuner's timings pick
    can differ from one process to the next, and with the block sizes the order of the GEMM's
    sums, hence which of two near-tied positions wins and the bits of a distance map.

    ``configs`` and ``cache`` are the autotuner's (tests narrow them to one configuration).
    """

    narrowed = False
    """True: every tuned kernel launches its first configuration only, as under deterministic
    algorithms (benchmarks/gpu_test_run.py sets it for a test run on a GPU, where tuning
    every test's shape would cost more than the tests)."""

    def __init__(self, kernel, configs: list[triton.Config], key: list[str], prune=None):
        self.kernel = kernel
        self.prune = prune
        pruning = None if prune is None else {"early_config_prune": prune}
        self.autotuner = triton.autotune(configs, key=key, prune_configs_by=pruning)(kernel)

    configs = property(lambda self: self.autotuner.configs,
                       lambda self, value: setattr(self.autotuner, "configs", value))
    cache = property(lambda self: self.autotuner.cache,
                     lambda self, value: setattr(self.autotuner, "cache", value))

    def first(self, args: tuple, kwargs: dict) -> triton.Config:
        """The configuration a deterministic launch with these arguments takes: the first of
        those the pruning keeps for them (the autotuner's own candidates), as the defaults
        differ by GPU and dot (`protokern.backends.triton.min_distance.configs_for`)."""
        configs = self.configs
        if self.prune is not None and len(configs) > 1:
            # positional arguments by name, as the autotuner passes them (constexprs by keyword)
            named = dict(zip(self.autotuner.arg_names, args, strict=False))
            configs = self.prune(configs, named, **kwargs)
        return configs[0]

    def __getitem__(self, grid):
        if Tuned.narrowed or torch.are_deterministic_algorithms_enabled():
            return lambda *args, **kwargs: Fixed(self.kernel, self.first(args, kwargs))[grid](
                *args, **kwargs)
        return self.autotuner[grid]


TARGETS = ("sm_90", "sm_80")
"""The GPU families the default configurations are sized for: Hopper (wgmma, its operands in
shared memory) and Ampere with the rest (mma.sync, operands in registers)."""

DOTS = ("half", "ieee", "tf32", "tf32x3")
"""What ``tl.dot`` runs on, which sets a tile's registers (`dot_kind`): 16-bit operands on
tensor cores; float32 (or float64) products by FMA, no tensor cores; TF32 tensor cores; three
TF32 products (`min_distance.gemm_precision`)."""


def dot_kind(element_bits: int, precision: str) -> str:
    """`DOTS`' name of a ``tl.dot`` of ``element_bits``-bit operands at ``precision`` (the
    kernel's ``PRECISION``): 16-bit operands ignore the precision."""
    return "half" if element_bits == 16 else precision


def target_of(capability: tuple[int, int]) -> str:
    """`TARGETS`' name for a GPU of compute ``capability``: Hopper's or Ampere's, the smaller
    tiles, for every other (Ampere, Ada, Blackwell: not compiled for here)."""
    return "sm_90" if capability[0] == 9 else "sm_80"


def pruning(configs_for, size: str):
    """An autotuner's ``early_config_prune`` (`tuned`'s ``prune``): of a launch's candidate
    configurations, those ``configs_for(size, dot, target)`` gives for the launch's argument
    named ``size`` (a shape argument or a constexpr), the `dot_kind` of its ``x_ptr`` and
    ``PRECISION``, and the `target_of` its GPU, in that list's order (so that `Tuned.first`
    is the list's first, whatever order the autotuner holds its candidates in); all of them
    where a test narrowed the candidates to none of those."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        x = named_args["x_ptr"]
        value = named_args[size] if size in named_args else kwargs[size]
        candidates = {id(c) for c in configs}
        kept = [c for c in configs_for(value, dot_kind(x.element_size() * 8, kwargs["PRECISION"]),
                                       target_of(torch.cuda.get_device_capability(x.device)))
                if id(c) in candidates]
        return kept or configs

    return prune


def config_lists(table: dict, make) -> dict:
    """``table``'s lists of configuration tuples as lists of ``make(*tuple)``, one Config object
    per distinct tuple, shared between the lists (the autotuner's candidates are the distinct
    objects; a pruning keeps those of the call's list by identity)."""
    made = {}
    return {key: [made.setdefault(c, make(*c)) for c in configs] for key, configs in table.items()}


def tuned(configs: list[triton.Config], key: list[str], interpreted: triton.Config,
          prune=None):
    """Decorator: autotune over ``configs`` keyed on the arguments named in ``key`` (`Tuned`:
    not under deterministic algorithms), less those ``prune(configs, named_args)`` drops for
    the call's arguments; in the interpreter, run ``interpreted`` only (autotuning there would
    run every config)."""

    def wrap(kernel):
        if INTERPRET:
            return Fixed(kernel, interpreted)
        return Tuned(kernel, configs, key, prune)

    return wrap


def positions_per_tile_image(args: dict) -> int:
    """``BLOCK_L``: the positions of one image in a tile, ``L`` rounded up to a power of two
    (at most the tile's ``BLOCK_ROWS``)."""
    return min(triton.next_power_of_2(args["L"]), args["BLOCK_ROWS"])


def images_per_tile(args: dict) -> int:
    """``IMAGES``: how many images share a tile's ``BLOCK_ROWS`` rows. 7x7 maps fill 49 of
    every 64 rows instead of 49 of 128; L = 1 packs ``BLOCK_ROWS`` images into a tile."""
    return args["BLOCK_ROWS"] // args["BLOCK_L"]


tile_rows = triton.heuristics({"BLOCK_L": positions_per_tile_image, "IMAGES": images_per_tile})
"""Splits a tile's rows into images x positions (kernels taking ``L`` and ``BLOCK_ROWS``)."""


def accumulator(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """Accumulation dtype (torch, triton) for inputs of ``dtype``: float64 stays, the rest
    accumulate in float32."""
    if dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def huge(dtype: torch.dtype) -> float:
    """Squared norms above this (``max / 8`` of the accumulation dtype) may overflow once added
    to another or doubled: the kernels compute such pairs directly, never by the expansion."""
    return torch.finfo(accumulator(dtype)[0]).max / 8


def dot_precision(x: Tensor) -> str:
    """``tl.dot``'s ``input_precision`` for float32 tiles of ``x``: TF32 where PyTorch lets
    float32 matmuls on CUDA round their inputs (to TF32 or coarser), IEEE otherwise."""
    return "tf32" if x.is_cuda and reference.input_rounding(x.dtype, x.device) > 0 else "ieee"


CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)
"""Most programs CUDA launches along a grid's x, y and z axes."""

MAX_POSITIONS = 2**31 - 1
"""Most window positions per image: the kernels hold a position in 32 bits."""


def smallest_block(configs: list[triton.Config], name: str) -> int:
    """The smallest ``name`` block among ``configs``: the most programs a launch may need."""
    return min(config.kwargs[name] for config in configs)


def check_grid(grid: tuple[int, ...], what: str, x: Tensor, prototypes: Tensor) -> None:
    """Raise ValueError, naming the limit, if ``grid`` exceeds CUDA's launch limits (checked in
    the interpreter too, so that it refuses what a GPU would)."""
    for axis, (programs, limit) in enumerate(zip(grid, CUDA_GRID_LIMITS, strict=False)):
        if programs > limit:
            raise ValueError(
                f"protokern triton {what}: x {tuple(x.shape)} and prototypes "
                f"{tuple(prototypes.shape)} need {programs} programs along axis {'xyz'[axis]} "
                f"of a launch grid, past CUDA's limit of {limit}; split the prototypes (or the "
                f"batch) into several calls, or use the cpu or cuda backend"
            )


def check_positions(length: int, what: str, x: Tensor, prototypes: Tensor) -> None:
    """Raise ValueError unless ``length`` window positions per image fit the kernels."""
    if length > MAX_POSITIONS:
        raise ValueError(
            f"protokern triton {what}: x {tuple(x.shape)} with prototypes "
            f"{tuple(prototypes.shape)} has {length} window positions per image; at most "
            f"2^31 - 1 are supported"
        )


def checked_map_geometry(x: Tensor, prototypes: Tensor, what: str,
                         configs: list[triton.Config], second: dict[str, int]
                         ) -> tuple[int, int, int, int]:
    """``(batch, num, length, out_w)`` of a reduction over positions (canonical ``x``
    ``(B, D, H, W)``, ``prototypes`` ``(M, D, ph, pw)``), after the checks its two launches
    need: the positions per image and both ``(B, M / BLOCK_M)`` grids, the tuned kernel's at
    the smallest ``BLOCK_M`` of ``configs`` and the fixed second pass's at ``second``'s."""
    batch, _, height, width = x.shape
    num, _, ph, pw = prototypes.shape
    out_w = width - pw + 1
    length = (height - ph + 1) * out_w
    check_positions(length, what, x, prototypes)
    for block in (smallest_block(configs, "BLOCK_M"), second["BLOCK_M"]):
        check_grid((batch, triton.cdiv(num, block)), what, x, prototypes)
    return batch, num, length, out_w


def contiguous_entries(x: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor, bool]:
    """``(x, prototypes, contiguous)`` for the kernels' ``CONTIGUOUS`` (`tiles`): with 1x1
    prototypes, ``x`` ``(B, D, H, W)`` with channels at stride 1 (channels_last: a copy unless
    they already are, as for tokens and channels_last maps) and ``prototypes`` ``(M, D, 1, 1)``
    likewise, and True; other windows unchanged, and False. The copy of a map is one pass over
    ``x``; loading rows of contiguous channels instead of scalars is what keeps the GEMM's
    loads vectorised (and asynchronous) and its registers unspilled."""
    if prototypes.shape[-2:] != (1, 1):
        return x, prototypes, False
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous(memory_format=torch.channels_last)
    if prototypes.shape[1] > 1 and prototypes.stride(1) != 1:
        prototypes = prototypes.contiguous()
    return x, prototypes, True


def on_device(x: Tensor):
    """Launch on ``x``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
