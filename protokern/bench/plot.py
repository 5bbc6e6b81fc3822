"""The scaling plot: time and peak memory against the number of prototypes M."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on benchmark machines
import matplotlib.pyplot as plt  # noqa: E402

LINE_STYLES = {"protokern": "-", "naive": "--", "keops": (0, (5, 1, 1, 1, 1, 1)), "floor": ":"}
"""Line style per contender kind; KeOps (dash-dot-dot) is not drawn as naive PyTorch."""


def scaling_plot(results: list[dict], path: str | Path, memory_cap_bytes: int,
                 title: str) -> None:
    """Two log-log panels, time and peak memory vs M, one line per contender.

    ``results`` are the sweep's (one shape family, one dtype, one pass); the line style says
    the contender's kind (`LINE_STYLES`). A contender's line stops at its last size that ran;
    the next size is marked with why it did not run (over the memory cap, out of memory,
    error).
    """
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.8))
    contenders = list(dict.fromkeys(r["contender"] for r in results))
    for name in contenders:
        rows = sorted((r for r in results if r["contender"] == name),
                      key=lambda r: r["num_prototypes"])
        ok = [r for r in rows if r["status"] == "ok"]
        stopped = [r for r in rows if r["status"] != "ok"]
        label = name
        if stopped:
            why = "over memory cap" if stopped[0]["status"] == "skipped" else stopped[0]["status"]
            label += f" ({why} at M={stopped[0]['num_prototypes']})"
        style = LINE_STYLES.get(rows[0]["kind"], "-")
        ms = [r["num_prototypes"] for r in ok]
        (line,) = ax_time.plot(ms, [1e3 * r["median_s"] for r in ok], linestyle=style,
                               marker="o", label=label)
        ax_mem.plot(ms, [max(r["peak_bytes"], 1) / 2**20 for r in ok], linestyle=style,
                    marker="o", color=line.get_color(), label=label)
        if ok and stopped:
            # an x at the size that did not run, level with the last one that did
            for ax, value in ((ax_time, 1e3 * ok[-1]["median_s"]),
                              (ax_mem, max(ok[-1]["peak_bytes"], 1) / 2**20)):
                ax.plot([stopped[0]["num_prototypes"]], [value], "x", color=line.get_color(),
                        markersize=10)
    ax_mem.axhline(memory_cap_bytes / 2**20, color="gray", linewidth=0.8, linestyle="-.",
                   label="memory cap")
    for ax, label in ((ax_time, "median time (ms)"), (ax_mem, "peak memory beyond inputs (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of prototypes M")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
