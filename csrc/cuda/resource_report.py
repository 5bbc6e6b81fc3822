"""The CUDA kernels' compiled resources as a Markdown table, from what compile_check.sh kept
(``PROTOKERN_CUDA_REPORT=FILE csrc/cuda/compile_check.sh 80 90``): per kernel and target, the
registers, spill bytes, stack and shared memory ptxas reported (``-Xptxas -v``), and whether
its PTX has ``cp.async`` (asynchronous global-to-shared copies), ``mma`` (tensor cores:
``wmma``/``mma.sync``) or ``wgmma`` (sm_90's warpgroup MMA).

    python3 csrc/cuda/resource_report.py OBJECT_DIR > report.md
"""

import re
import subprocess
import sys
from pathlib import Path

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def demangle(name: str) -> str:
    done = subprocess.run(["c++filt", name], capture_output=True, text=True, check=False)
    readable = done.stdout.strip() or name
    # protokern::cuda::(anonymous namespace)::kernel<T...>(args) -> kernel<T...>
    readable = readable.split("(anonymous namespace)::")[-1]
    return readable.split("(")[0]


def ptx_instructions(keep: Path) -> dict[str, set[str]]:
    """Per mangled entry name, which of cp.async (copies, not only their commit/wait), mma
    (``mma.sync``, ``wmma.mma``) and wgmma its PTX body has."""
    patterns = {"cp.async": ("cp.async.ca", "cp.async.cg"), "mma": ("mma.sync", "wmma.mma"),
                "wgmma": ("wgmma",)}
    found = {}
    for ptx in keep.glob("*.ptx"):
        text = ptx.read_text()
        entries = list(re.finditer(r"\.entry (\S+)\(", text))
        for match, following in zip(entries, entries[1:] + [None], strict=True):
            body = text[match.end():following.start() if following else len(text)]
            found[match.group(1)] = {name for name, needles in patterns.items()
                                     if any(needle in body for needle in needles)}
    return found


def rows(objects: Path) -> list[str]:
    out = []
    for log in sorted(objects.glob("*.log")):
        source, target = log.stem.rsplit(".", 1)
        instructions = ptx_instructions(objects / "keep" / log.stem)
        entry = None
        frame = (0, 0, 0)
        for line in log.read_text().splitlines():
            if match := ENTRY.search(line):
                entry = match.group(1)
            elif (match := FRAME.search(line)) and entry:
                frame = tuple(int(g) for g in match.groups())
            elif (match := re.search(r"Used (\d+) registers", line)) and entry:
                smem = re.search(r"(\d+) bytes smem", line)
                flags = ", ".join(sorted(instructions.get(entry, set()))) or "-"
                out.append(f"| {source}.cu | `{demangle(entry)}` | {target} | {match.group(1)} | "
                           f"{frame[1]} | {frame[0]} | {smem.group(1) if smem else 0} | {flags} |")
                entry, frame = None, (0, 0, 0)
    return out


def main() -> None:
    table = rows(Path(sys.argv[1]))
    print("| file | kernel | target | registers | spill store bytes | stack bytes | "
          "shared bytes | PTX has |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
