"""Metrics CSV of a run and its curves (loss, top-1 accuracy, validation tau over steps).

Lightning's CSV logger writes one `logs/version_N/metrics.csv` per (re)start of a run;
`collect_metrics` merges them into `RUN/metrics.csv` (a resumed version replaces the steps the
killed one logged after its last checkpoint). `plot_runs` overlays any number of runs.
"""

from __future__ import annotations

import csv
from pathlib import Path

from matplotlib import rcParams
from matplotlib.figure import Figure

from specalign.errors import DataError
from specalign.io import atomic_path

# panel title -> (train column, val column)
PANELS = {
    "loss": ("train/loss_step", "val/loss"),
    "top-1 accuracy": ("train/top1_step", "val/top1"),
    "val tau (mean accepted length)": (None, "val/tau"),
}

Series = dict[str, tuple[list[int], list[float]]]


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def collect_metrics(run: str | Path) -> Path:
    """Merge RUN/logs/version_*/metrics.csv into RUN/metrics.csv (columns: union, step first)."""
    run = Path(run)
    versions = sorted((run / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    parts = [_read_csv(p) for p in versions]
    rows: list[dict] = []
    for i, part in enumerate(parts):
        later = [int(r["step"]) for p in parts[i + 1:] for r in p[:1]]
        rows += [r for r in part if not later or int(r["step"]) < min(later)]
    columns = ["step", "epoch"] + sorted({k for r in rows for k in r} - {"step", "epoch"})
    out = run / "metrics.csv"
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return out


def load_metrics(path: str | Path) -> Series:
    """metrics.csv -> {column: (steps, values)} over the rows where that column is set."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no metrics here", "is this a run directory written by `specalign train`?")
    series: Series = {}
    for r in _read_csv(path):
        for k, v in r.items():
            if k not in ("step", "epoch") and v not in ("", None):
                steps, values = series.setdefault(k, ([], []))
                steps.append(int(r["step"]))
                values.append(float(v))
    return series


def plot_runs(runs: dict[str, Series], out: str | Path) -> Path:
    """One figure, one panel per PANELS entry; per run one colour, train dashed, val solid."""
    fig = Figure(figsize=(5 * len(PANELS), 4))     # its own canvas: no pyplot state, no backend switch
    axes = fig.subplots(1, len(PANELS), squeeze=False)
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, cols) in zip(axes[0], PANELS.items()):
        for i, (label, series) in enumerate(runs.items()):
            for col, style in zip(cols, ("--", "-")):
                if col in series:
                    name = col.split("/")[0]
                    ax.plot(*series[col], style, color=colors[i % len(colors)], label=f"{label} {name}",
                            marker="o" if style == "-" else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png", metadata={"Software": "specalign plot"})  # io.claim_file
    return out
