"""The benchmark suite's reusable part, behind ``protokern bench`` and ``benchmarks/``.

- `protokern.bench.shapes`: the named shapes of DESIGN §6 and their GEMM floor,
- `protokern.bench.contenders`: protokern backends, naive PyTorch, KeOps and the bare GEMM,
- `protokern.bench.measure`: timing and peak memory of one case (fresh process on CPU),
- `protokern.bench.runner`: planning, skipping what cannot fit, progress, environment,
- `protokern.bench.report` and `protokern.bench.plot`: the table, the JSON, the scaling plot,
- `protokern.commands.bench`: the ``protokern bench`` command.
"""
