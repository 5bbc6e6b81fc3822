"""Time and added memory of each porting recipe of docs/porting.md against its original
formula (tests/originals.py), side by side in one process, at the model's typical shape.

    PYTHONPATH=$PWD python docs/porting_bench.py [--device cpu] [--repeats 5] [--batch 16]

The head step: forward and backward from the add-on features (requires_grad) to the
recipe's outputs, float32. Time: the median of ``--repeats`` runs after one warm-up. Memory:
the peak resident set (CPU; glibc's mmap threshold fixed so that freed maps return) or the
peak allocated CUDA memory beyond the state before the step. Prints one line per recipe and
the environment (CPU model and ISA, threads, torch version).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import originals  # noqa: E402
from porting_doc import recipes  # noqa: E402

from protokern.bench.measure import fix_malloc_threshold, peak_of_next_call  # noqa: E402
from protokern.bench.runner import cpu_family_model, cpu_isa, device_name  # noqa: E402


def cases(batch: int, device: str) -> list[tuple[str, str, object, object, list]]:
    """(name, shape, recipe step, original step, tensors they differentiate) per recipe."""
    recipe = recipes()

    def p(*shape):
        return nn.Parameter(torch.rand(*shape, device=device))

    def x(dim, size=7):
        return torch.rand(batch, dim, size, size, device=device, requires_grad=True)

    out = []
    head = originals.ProtoPNetHead(2000, 128, 200).to(device)
    ppnet = SimpleNamespace(prototype_vectors=head.prototype_vectors, epsilon=1e-4,
                            last_layer=head.last_layer)
    f = x(128)
    out.append(("ProtoPNet", f"x ({batch}, 128, 7, 7), M 2000, K 200",
                lambda f=f: recipe["protopnet"](ppnet, f)[0], lambda f=f: head(f)[0],
                [f, head.prototype_vectors]))
    tes, f = p(2000, 64, 1, 1), x(64)
    out.append(("TesNet", f"x ({batch}, 64, 7, 7), M 2000",
                lambda f=f, t=tes: recipe["tesnet"](SimpleNamespace(prototype_vectors=t), f),
                lambda f=f, t=tes: originals.tesnet_activations(f, t), [f, tes]))
    trivial, support, f = p(2000, 64, 1, 1), p(2000, 64, 1, 1), x(64)
    st = SimpleNamespace(prototype_vectors_trivial=trivial, prototype_vectors_support=support)
    out.append(("ST-ProtoPNet", f"x ({batch}, 64, 7, 7), 2 x M 2000",
                lambda f=f: sum(recipe["st-protopnet"](st, f)),
                lambda f=f: sum(originals.st_protopnet_activations(f, trivial, support)),
                [f, trivial, support]))
    pool, f = p(202, 256, 1, 1), x(256)
    ones = torch.ones_like(pool)
    out.append(("ProtoPool", f"x ({batch}, 256, 7, 7), M 202",
                lambda f=f: recipe["protopool"](SimpleNamespace(prototype_vectors=pool,
                                                                epsilon=1e-4), f),
                lambda f=f: originals.focal_similarity(f, pool, ones), [f, pool]))
    deform, f = p(2000, 128, 1, 1), x(128)
    out.append(("Deformable ProtoPNet (top-4 mean)", f"x ({batch}, 128, 7, 7), M 2000",
                lambda f=f: recipe["deformable-protopnet"](
                    SimpleNamespace(prototype_vectors=deform, k=4), f),
                lambda f=f: originals.deformable_topk_similarity(f, deform, 4), [f, deform]))
    tree, f = p(511, 256, 1, 1), x(256)
    out.append(("ProtoTree", f"x ({batch}, 256, 7, 7), M 511 (depth 9)",
                lambda f=f: recipe["prototree"](SimpleNamespace(prototype_vectors=tree), f),
                lambda f=f: originals.prototree_distances(f, tree), [f, tree]))
    tasks, f = [p(500, 128, 1, 1) for _ in range(4)], x(128)
    out.append(("ICICLE", f"x ({batch}, 128, 7, 7), 4 tasks x M 500",
                lambda f=f: recipe["icicle"](SimpleNamespace(task_prototypes=tasks,
                                                             epsilon=1e-4), f),
                lambda f=f: originals.icicle_activations(f, tasks), [f, *tasks]))
    return out


def step(forward, inputs) -> None:
    """One head step: forward, then the gradients of a fixed weighting of the outputs."""
    out = forward()
    torch.autograd.grad(out.sum(), inputs)


def measure(forward, inputs, repeats: int, device: str) -> tuple[float, int]:
    """(median seconds, added peak bytes) of `step`."""
    step(forward, inputs)  # warm-up: first-call costs out
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(forward, inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(forward, inputs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak, _ = peak_of_next_call(lambda: step(forward, inputs))
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    if args.device == "cpu":
        fix_malloc_threshold()
    print(f"device: {device_name(args.device)} ({cpu_family_model()}); "
          f"ISA: {' '.join(cpu_isa())}; "
          f"threads: {torch.get_num_threads()}; torch {torch.__version__}; float32")
    print(f"command: PYTHONPATH=$PWD python docs/porting_bench.py --device {args.device} "
          f"--repeats {args.repeats} --batch {args.batch}")
    for name, shape, recipe_step, original_step, inputs in tqdm(
            cases(args.batch, args.device), desc="recipes", leave=False):
        recipe_time, recipe_peak = measure(recipe_step, inputs, args.repeats, args.device)
        original_time, original_peak = measure(original_step, inputs, args.repeats,
                                               args.device)
        print(f"| {name} | {shape} | {recipe_time * 1e3:.1f} ms vs {original_time * 1e3:.1f} ms "
              f"({original_time / recipe_time:.1f}x faster) | {recipe_peak / 2**20:.1f} MiB vs "
              f"{original_peak / 2**20:.1f} MiB "
              f"({original_peak / max(recipe_peak, 1):.1f}x less) |")


if __name__ == "__main__":
    main()
