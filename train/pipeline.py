"""`specalign pipeline [pipeline=quick]`: every stage on the embedded synthetic world.

    synth -> teach the tiny pair (cached) -> extract (1 s and 500 ms clips, one store)
          -> train the runs (TokenAdapter with / without the draft, EAGLE-3 on target / draft / both
             features) -> export -> evaluate offline (+ online on a few test requests) -> summary

Each step composes the stage's own config (conf/<stage>.yaml) with overrides from
conf/pipeline/<preset>.yaml and calls the same function the stage's CLI calls, so the
pipeline runs exactly what a user runs stage by stage. The preset is the plan: which runs of which
drafter types (`runs`, starting from `drafters.<kind>`), which reports pair which runs (`reports`),
which of them decode online. The world and the taught pair are cached under `cache` by a key of their
configuration; everything else goes to `out`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from hydra import compose
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from specalign.specdec.report import entry_label, is_baseline

from specalign.io import claim_output, write_json, write_text
from specalign.runtime import torch_threads
from specalign.stage import hydra_stage

log = logging.getLogger("specalign.pipeline")
console = Console()


class Steps:
    """Numbered, timed step headers."""

    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.perf_counter()

    def __call__(self, title: str) -> None:
        self.n += 1
        console.rule(f"[bold]{self.n}/{self.total} {title}[/]  ({time.perf_counter() - self.t0:.0f} s)")


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, str):
        return "'" + v.replace("'", "\\'") + "'"
    return str(v)


def overrides(d: dict | DictConfig | None, prefix: str = "") -> list[str]:
    """Flatten a mapping into Hydra `key=value` overrides."""
    d = OmegaConf.to_container(d, resolve=True) if isinstance(d, DictConfig) else (d or {})
    out = []
    for k, v in d.items():
        out += overrides(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}={_value(v)}"]
    return out


def key_of(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ steps

def make_world(P: DictConfig, cache: Path) -> dict:
    from specalign.data.synth import WorldConfig, synthesize

    world = OmegaConf.to_container(P.world, resolve=True)
    out = cache / "worlds" / key_of(world)
    done = out / "done.json"
    if not done.exists():
        settings = {k: v for k, v in world.items() if k in WorldConfig.__dataclass_fields__}
        synthesize(out, world["clips"], world["seed"], tuple(world["durations"]), WorldConfig(**settings),
                   workers=world.get("workers", 1))
        write_json(done, world)
    else:
        console.print(f"world from the cache: {out}")
    return {**world, "out": str(out)}


def teach(P: DictConfig, world: dict, cache: Path) -> tuple[Path, Path]:
    from specalign.train.teach import cached_teach

    return cached_teach(world, OmegaConf.to_container(P.teach, resolve=True), cache / "teach")


def extract(P: DictConfig, world: dict, pair: tuple[Path, Path], store: Path) -> Path:
    from specalign.train.extract import extract as run_extract

    for d in world["durations"]:
        cfg = compose("extract", [f"data=synthetic_{d}", f"data.root={world['out']}/synthetic_{d}",
                                  "models=tiny", "models.tiny=false", f"models.target.path={pair[0]}",
                                  f"models.draft.path={pair[1]}", f"out={store}", *overrides(P.extract)])
        run_extract(cfg)
    return store


def train_config(P: DictConfig, store: Path, run: Path, name: str) -> DictConfig:
    """The `specalign train` config of run `name`: its drafter type's starting point (an experiment, else
    conf/adapter/<kind>), the pipeline's trainer keys, the type's and the run's own keys."""
    spec = P.runs[name]
    base = P.drafters.get(spec.kind) or {}
    start = f"experiment={base.experiment}" if base.get("experiment") else f"adapter={spec.kind}"
    return compose("train", [start, f"store={store}", f"out={run}", *overrides(P.trainer, "trainer."),
                             *overrides(base.get("trainer"), "trainer."), *overrides(base.get("adapter"), "adapter."),
                             *overrides(spec.get("adapter"), "adapter.")])


def train_run(P: DictConfig, store: Path, run: Path, name: str) -> Path:
    from specalign.train.train import train as run_train

    run_train(train_config(P, store, run, name))
    return run


def export(run: Path, out: Path, fmt: str = "native") -> Path:
    from specalign.train.export import export_run

    return export_run(run, out, fmt)


def evaluate(P: DictConfig, store: Path, drafter: Path, out: Path, no_draft: Path | None = None,
             trees: bool = False) -> dict:
    """The offline report; `trees`: with draft trees at the largest gamma (`evaluate.tree`) beside the chains."""
    from specalign.specdec.evaluate import evaluate_identity, evaluate_offline
    from specalign.specdec.report import write_report

    claim_output(out, "evaluate", evaluate_identity({"store": store, "drafter": drafter, "no_draft": no_draft}))
    from specalign.specdec.tree import tree_spec

    gammas, tree = list(P.evaluate.gammas), P.evaluate.get("tree") or {}
    tree = tree_spec({**tree, "gammas": tree.get("gammas") or gammas[-1:]} if trees else None, gammas)
    report = evaluate_offline(store, "test", gammas, str(drafter), str(no_draft) if no_draft else None,
                              P.evaluate.get("temperature"), tree=tree)
    write_report(report, out)
    return report


def evaluate_online(P: DictConfig, store: Path, drafter: Path, pair: tuple[Path, Path], out: Path) -> dict:
    from specalign.specdec.evaluate import evaluate_identity
    from specalign.specdec.online_eval import evaluate_online as run_online
    from specalign.specdec.report import write_report

    claim_output(out, "evaluate", evaluate_identity({"mode": "online", "store": store, "drafter": drafter}))
    cfg = compose("evaluate", [f"drafter={drafter}", f"store={store}", "mode=online", "split=test",
                               f"gamma={P.evaluate.gammas[-1]}", f"out={out}", f"limit={P.evaluate.online_limit}",
                               "models=tiny", "models.tiny=false", f"models.target.path={pair[0]}",
                               f"models.draft.path={pair[1]}"])  # the datasets are recorded in the store
    report = run_online(cfg, [int(P.evaluate.gammas[-1])])
    write_report(report, out)
    return report


# ------------------------------------------------------------------------------------------ summary

def summary_rows(reports: dict[str, dict], gamma: int) -> list[dict]:
    """One row per drafter and baseline (baselines once), at `gamma`, test split."""
    rows, seen = [], set()
    for label, report in reports.items():
        for name, per_gamma in report["results"].items():
            key = entry_label(label, name)
            if key in seen:
                continue
            seen.add(key)
            if str(gamma) not in per_gamma:
                continue
            s = per_gamma[str(gamma)]
            width = report.get("tree", {}).get("width", {}).get(name, {}).get(str(gamma), gamma)
            sched = (report.get("projected_by_schedule") or {}).get(name) or {}
            rows.append({"drafter": key, "baseline": is_baseline(name), "tau": s["tau"], "alpha": s["alpha"],
                         "rounds": s["rounds"], "samples": s["samples"], "width": width,
                         "schedule": sched.get("schedule"), "e2e": (sched.get("projected_e2e") or {}).get(str(gamma))})
    return sorted(rows, key=lambda r: (r["baseline"], -r["tau"]))


def print_summary(rows: list[dict], online: dict, gamma: int, where: dict[str, Path], n_online: int) -> str:
    table = Table(title=f"acceptance on the test split, γ={gamma} (offline, exact)")
    online_col = f"online τ ({n_online} req.)"
    for col in ("drafter", "τ", "α", "rounds", "width", online_col, "schedule", "e2e (projected)"):
        table.add_column(col, justify="left" if col in ("drafter", "schedule") else "right")
    md = [f"| drafter | τ (γ={gamma}) | α | rounds | width | {online_col} | schedule | end to end (projected) |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        on = online.get(r["drafter"])
        cells = [r["drafter"], f"{r['tau']:.3f}", f"{r['alpha']:.3f}", str(r["rounds"]), f"{r['width']:.3g}",
                 "" if on is None else f"{on:.3f}", r.get("schedule") or "",
                 "" if r.get("e2e") is None else f"{r['e2e']:.2f}x"]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(table)
    for what, path in where.items():
        console.print(f"  {what:<14} {path}")
    return "\n".join(md) + "\n"


def run_pipeline(cfg: DictConfig) -> dict:
    with torch_threads(cfg.threads):
        return pipeline(cfg)


def pipeline(cfg: DictConfig) -> dict:
    P = cfg.pipeline
    out, cache = Path(cfg.out), Path(cfg.cache)
    claim_output(out, "pipeline", {"pipeline": OmegaConf.to_container(P, resolve=True)})
    step = Steps(7)

    step("synthetic world")
    world = make_world(P, cache)
    step("teach the tiny pair (cached)")
    pair = teach(P, world, cache)
    step("extract paired tokens and hidden states")
    store = extract(P, world, pair, out / "store")

    step(f"train {len(P.runs)} drafters: {', '.join(P.runs)}")
    runs = {name: train_run(P, store, out / "runs" / name, name) for name in P.runs}

    step("export")
    drafters = {name: export(run, out / "drafters" / name) for name, run in runs.items()}
    for name in P.speculators:
        export(runs[name], out / "drafters" / f"{name}_speculators", "speculators")

    step("evaluate offline on the test split")
    tree_reports = (P.evaluate.get("tree") or {}).get("reports") or []
    reports = {label: evaluate(P, store, drafters[r.drafter], out / "reports" / label,
                               drafters[r.no_draft] if r.get("no_draft") else None, label in tree_reports)
               for label, r in P.reports.items()}

    step("evaluate online (real speculative decoding with the tiny target)")
    online = {}
    if P.evaluate.online_limit:
        for label in P.online:
            r = P.reports[label]
            rep = evaluate_online(P, store, drafters[r.drafter], pair, out / "reports" / f"{label}_online")
            for name, per_gamma in rep["results"].items():
                online[entry_label(label, name)] = per_gamma[str(P.evaluate.gammas[-1])]["tau"]

    from specalign.train.curves import plot_runs
    from specalign.train.plot import metrics_of

    curves = plot_runs({name: metrics_of(run) for name, run in runs.items()}, out / "curves.png")
    gamma = int(P.evaluate.gammas[-1])
    rows = summary_rows(reports, gamma)
    where = {"world": Path(world["out"]), "taught pair": pair[0].parent, "store": store,
             "runs": out / "runs", "drafters": out / "drafters", "reports": out / "reports", "curves": Path(curves)}
    md = print_summary(rows, online, gamma, where, int(P.evaluate.online_limit or 0))
    summary = {"gamma": gamma, "rows": rows, "online_tau": online, "where": {k: str(v) for k, v in where.items()},
               "seconds": time.perf_counter() - step.t0}
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", md)
    console.print(f"done in {summary['seconds']:.0f} s; summary in {out / 'summary.md'}")
    return summary


@hydra_stage("pipeline")
def main(cfg: DictConfig) -> dict:
    return run_pipeline(cfg)
