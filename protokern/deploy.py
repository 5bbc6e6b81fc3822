"""Shipping trained modules: an exported program with a dynamic batch, its ONNX file, and that
file run in onnxruntime on the CPU.

    program = export_program(model, (images,))  # torch.export; the batch dimension dynamic
    export_onnx(program, "model.onnx", ["images"], ["logits", "min_distances", "indices"])
    logits, min_distances, indices = run_onnx("model.onnx", (images,))

The protokern ops in a module become their ATen formulations when exported
(`protokern.decompositions`), so neither the program nor the file needs protokern to run.
Exported models are inference only. The ONNX half needs the ``onnx`` extra (onnx, onnxruntime,
onnxscript; `missing_onnx_packages`).
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
"""What ``torch.onnx.export(..., dynamo=True)`` and `run_onnx` import: protokern's ``onnx``
extra."""


def missing_onnx_packages() -> list[str]:
    """The `ONNX_PACKAGES` this environment lacks."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def export_program(module: nn.Module, inputs: Sequence[Tensor]) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``module``, switched to eval mode, on example ``inputs``, with
    dimension 0 of every input (the batch, one size for all of them) dynamic: the program runs
    at any batch size of at least 1."""
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(module.eval(), tuple(inputs),
                               dynamic_shapes=tuple({0: batch} for _ in inputs))


def export_onnx(program: torch.export.ExportedProgram, path: str | Path,
                input_names: Sequence[str], output_names: Sequence[str], *,
                optimize: bool = True) -> Path:
    """Write ``program`` to the ONNX file ``path`` with ``torch.onnx.export(..., dynamo=True)``,
    its weights inside the file (one file to ship; ONNX caps that at 2 GB), the inputs and
    outputs named in order of the program's flattened ones; ``optimize``: let onnxscript fold
    constants and drop dead nodes (about a third of the export's time; onnxruntime optimises
    the graph again when it loads it). Returns the path."""
    path = Path(path)
    torch.onnx.export(program, f=path, dynamo=True, external_data=False, verbose=False,
                      optimize=optimize, input_names=list(input_names),
                      output_names=list(output_names))
    return path


def run_onnx(path: str | Path, inputs: Sequence[Tensor]) -> list[Tensor]:
    """The outputs of the ONNX file ``path`` on ``inputs`` (in the file's input order), run by
    onnxruntime's CPU provider."""
    import onnxruntime  # the onnx extra: imported only here

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {spec.name: tensor.detach().cpu().numpy()
             for spec, tensor in zip(session.get_inputs(), inputs, strict=True)}
    return [torch.from_numpy(output) for output in session.run(None, feeds)]
