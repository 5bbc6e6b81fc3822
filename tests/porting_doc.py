"""The porting recipes of docs/porting.md, loaded from the document itself, for the tests
(tests/models/test_porting_recipes.py) and the timings (docs/porting_bench.py)."""

import re
from pathlib import Path

import torch

import protokern as pk

DOC = Path(__file__).resolve().parents[1] / "docs" / "porting.md"


def recipes() -> dict[str, object]:
    """name -> the function the ``# recipe: name`` code block of docs/porting.md defines (run
    with ``pk`` and ``torch`` in scope)."""
    found = {}
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S):
        first = block.splitlines()[0]
        if first.startswith("# recipe: "):
            namespace = {"pk": pk, "torch": torch}
            exec(compile(block, f"{DOC}:{first}", "exec"), namespace)
            (function,) = [value for key, value in namespace.items()
                           if key not in ("pk", "torch", "__builtins__") and callable(value)]
            found[first.removeprefix("# recipe: ")] = function
    return found
