"""The VQ layer, PatchCore scoring and the coreset against the formulations their users run
today, side by side in one process: median time and peak resident memory of each.

- ``vq``: `protokern.nn.VectorQuantizer` forward + backward at the ``vq`` shape (32 x 1024
  tokens, D = 256, 16384 codes) against vector-quantize-pytorch's formulation (the ``cdist``
  matrix, ``argmin``, a gather, the same losses and straight-through estimator);
- ``patchcore``: `protokern.nn.PatchMemoryBank.score` at the ``patchcore`` shape (8 x 28 x 28
  patches, D = 1024, a bank of 16384) with anomalib's reweighting over 9 neighbours, against
  anomalib's formulation (the full ``cdist`` matrix, then its minimum and ``topk``) and against
  faiss-cpu's exact ``IndexFlatL2`` search when installed;
- ``coreset``: greedy k-center at a bank of 50000 x 256 keeping 1% (500 centers), against
  anomalib's Python loop with an ``(N, D)`` temporary per step.

Peak memory is the resident-set high-water mark of this process (``VmHWM`` after a reset,
with glibc's mmap threshold fixed so that freed blocks leave the resident set:
`protokern.bench.measure`) over the timed calls, minus the resident memory before them.

    PYTHONPATH=$PWD python benchmarks/vq_anomaly.py --json benchmarks/results/...json
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

import protokern as pk
from protokern.backends import cpu as cpu_backend
from protokern.bench.measure import fix_malloc_threshold, reset_rss_peak, rss_bytes
from protokern.bench.runner import (
    command_line,
    cpu_family_model,
    cpu_isa,
    device_name,
    git_commit,
)
from protokern.bench.shapes import SHAPES
from protokern.commands.anomaly import cdist_k_center, cdist_scores
from protokern.nn.coreset import k_center_greedy


def measure(step: Callable[[], object], repeats: int, warmup: int) -> dict:
    """Median seconds of ``repeats`` calls after ``warmup`` untimed ones, and the peak resident
    bytes beyond the baseline during the timed calls."""
    for _ in range(warmup):
        step()
    reset_rss_peak()
    baseline = rss_bytes("VmRSS")
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {"median_s": statistics.median(times), "times_s": times,
            "peak_bytes": rss_bytes("VmHWM") - baseline}


def vq_case(repeats: int, warmup: int) -> dict:
    shape = SHAPES["vq"]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape.batch, shape.height, shape.dim, generator=generator)  # (B, L, D)
    vq = pk.nn.VectorQuantizer(shape.num_prototypes, shape.dim)
    codebook = vq.codebook

    def protokern_vq():
        tokens = x.clone().requires_grad_()
        quantized, indices, loss = vq(tokens)
        (quantized.sum() + loss).backward()
        return indices

    def cdist_vq():  # vector-quantize-pytorch's EuclideanCodebook, without EMA
        tokens = x.clone().requires_grad_()
        flat = tokens.reshape(-1, shape.dim)
        distances = torch.cdist(flat, codebook)  # (N, M)
        indices = distances.argmin(-1)
        del distances
        codes = codebook[indices]
        loss = 0.25 * F.mse_loss(flat, codes.detach()) + F.mse_loss(codes, flat.detach())
        quantized = flat + (codes - flat).detach()
        (quantized.sum() + loss).backward()
        return indices.view(shape.batch, -1)

    same = bool(torch.equal(protokern_vq(), cdist_vq()))
    vq.zero_grad()
    return {"shape": shape.describe(), "pass": "forward+backward", "same_indices": same,
            "contenders": {"protokern VectorQuantizer": measure(protokern_vq, repeats, warmup),
                           "vector-quantize-pytorch cdist+argmin+gather": measure(
                               cdist_vq, repeats, warmup)}}


def faiss_scores(bank: torch.Tensor, features: torch.Tensor, neighbors: int):
    """PatchCore's scores with faiss-cpu's exact search for both nearest-neighbour steps."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    batch, dim = features.shape[:2]
    index = faiss.IndexFlatL2(dim)
    index.add(bank.numpy())
    embedding = features.permute(0, 2, 3, 1).reshape(-1, dim).contiguous()
    values, locations = index.search(embedding.numpy(), 1)
    patch_scores = torch.from_numpy(values[:, 0]).clamp_min(0).sqrt().view(batch, -1)
    locations = torch.from_numpy(locations[:, 0]).view(batch, -1)
    rows = torch.arange(batch)
    worst = patch_scores.argmax(1)
    _, support = index.search(bank[locations[rows, worst]].numpy(), neighbors)
    queries = embedding.view(batch, -1, dim)[rows, worst]
    to_support = (queries[:, None] - bank[torch.from_numpy(support)]).norm(dim=-1)
    return patch_scores, patch_scores.amax(1) * (1 - to_support.softmax(1)[:, 0])


def patchcore_case(repeats: int, warmup: int, neighbors: int = 9) -> dict:
    shape = SHAPES["patchcore"]
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(shape.batch, shape.dim, shape.height, shape.width, generator=generator)
    bank = torch.randn(shape.num_prototypes, shape.dim, generator=generator)
    memory = pk.nn.PatchMemoryBank(shape.dim, coreset_ratio=1.0, num_neighbors=neighbors)
    memory.fit(bank)
    contenders = {
        "protokern PatchMemoryBank.score": lambda: memory.score(features),
        "anomalib cdist+min+topk": lambda: cdist_scores(bank, features, neighbors),
    }
    try:
        import faiss  # noqa: F401
        contenders["faiss-cpu IndexFlatL2"] = lambda: faiss_scores(bank, features, neighbors)
    except ImportError:
        pass
    reference = memory.score(features).image_scores
    agreement = {name: float((fn()[1] - reference).abs().max())
                 for name, fn in contenders.items()}
    return {"shape": shape.describe() + f", reweighting over {neighbors} neighbours",
            "image_scores_max_abs_difference": agreement,
            "contenders": {name: measure(fn, repeats, warmup)
                           for name, fn in contenders.items()}}


def coreset_case(repeats: int, warmup: int) -> dict:
    count, dim, ratio = 50_000, 256, 0.01
    points = torch.randn(count, dim, generator=torch.Generator().manual_seed(0))
    centers = int(count * ratio)
    same = bool(torch.equal(k_center_greedy(points, centers), cdist_k_center(points, centers, 0)))
    return {"shape": f"N={count} D={dim}, keeping {ratio:.0%} ({centers} centers)",
            "same_indices": same,
            "contenders": {"protokern k_center_greedy": measure(
                lambda: k_center_greedy(points, centers), repeats, warmup),
                "anomalib Python loop": measure(lambda: cdist_k_center(points, centers, 0),
                                                repeats, warmup)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cases", default="vq,patchcore,coreset")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fix_malloc_threshold()
    cases = {"vq": vq_case, "patchcore": patchcore_case, "coreset": coreset_case}
    results = {}
    for name in args.cases.split(","):
        results[name] = cases[name](args.repeats, args.warmup)
        base = next(iter(results[name]["contenders"].values()))
        print(f"{name}: {results[name]['shape']}")
        for contender, row in results[name]["contenders"].items():
            print(f"  {contender:45s} {row['median_s'] * 1e3:10.1f} ms  x"
                  f"{row['median_s'] / base['median_s']:6.2f} time  "
                  f"{row['peak_bytes'] / 2 ** 20:9.1f} MiB peak")
    record = {"environment": {
        "command": command_line([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "device": "cpu", "cpu_name": device_name("cpu"),
        "cpu_family_model": cpu_family_model(), "cpu_isa": cpu_isa(),
        "cpu_gemm": cpu_backend.gemm_in_use(),
        "cpu_count": len(os.sched_getaffinity(0)),
        "load_average_1_5_15min": list(os.getloadavg()), "threads": args.threads,
        "dtype": "float32", "torch": torch.__version__, "repeats": args.repeats,
        "warmup": args.warmup, "protokern_backends": pk.available_backends("cpu"),
        "note": "the machine is shared with other workers; the load average says how busy"},
        "results": results}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(record, out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
