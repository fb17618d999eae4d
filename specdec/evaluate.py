"""`specalign evaluate drafter=DIR store=STORE mode=offline|online gamma=5 split=test out=REPORT_DIR`.

Writes report.json, report.md and plots. Every report shows the drafter beside its
baselines: `raw_draft` (the draft model's own free-running tokens), `draft_model` (EventGPT
as an ordinary draft model, full stores), `no_draft` (the drafter without draft
conditioning) and any token lists stored with the pairs (e.g. an earlier adapter's output).

A drafter is evaluated only on a store of the models it was trained on (specalign.identity:
sizes always, models/weights/layers/prompts unless allow_store_mismatch=true).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from specalign.data.store import FeatureStore
from specalign.specdec import offline
from specalign.specdec.replay import rounds_trace
from specalign.specdec.report import RAW_DRAFT, write_report
from specalign.specdec.tree import TREE_SUFFIX, TreeSpec, check_tree_drafter, tree_notes, tree_spec

from specalign.errors import SpecalignError
from specalign.identity import check_drafter_store
from specalign.io import claim_output
from specalign.stage import hydra_stage

log = logging.getLogger("specalign.evaluate")


def gammas_of(value) -> list[int]:
    vals = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [value]
    out = sorted({int(v) for v in vals})
    if not out or out[0] < 1:
        raise SpecalignError(f"gamma must be a positive integer or a list of them, got {value!r}")
    return out


def check_drafters(store: FeatureStore, paths: list[str | None], allow_mismatch: bool = False) -> None:
    """Refuse drafters trained on a store of other models than `store` (see specalign.identity)."""
    for path in filter(None, paths):
        check_drafter_store(path, store.manifest, store.root, allow_mismatch)


def evaluate_identity(cfg_or_args: dict) -> dict:
    """What a report directory is: the mode and the inputs it measured (a rerun may rewrite it)."""
    where = {k: str(Path(cfg_or_args[k]).resolve()) if cfg_or_args.get(k) else None
             for k in ("store", "drafter", "no_draft")}
    return {"mode": cfg_or_args.get("mode", "offline"), **where}


def evaluate_offline(store_path, split: str, gammas: list[int], drafter: str | None = None,
                     no_draft: str | None = None, temperature: float | None = None,
                     allow_store_mismatch: bool = False, tree: TreeSpec | None = None) -> dict:
    from specalign.specdec.drafters import report_drafters

    store = FeatureStore(store_path)
    check_drafters(store, [drafter, no_draft], allow_store_mismatch)
    rows = store.select(split)
    if not rows:
        raise SpecalignError(f"{store_path}: split '{split}' has no rows (splits: {store.manifest['counts']['splits']})")
    drafters, tree = report_drafters(drafter, no_draft, "offline"), tree or TreeSpec()
    check_tree_drafters(drafters, tree)
    group = lambda r: r.duration
    streaming = {d.name for d in drafters if offline.runs_per_gamma(d)}
    runs = {d.name: offline.drafter_runs(d, store, rows, max(gammas)) for d in drafters if d.name not in streaming}
    runs |= offline.baseline_runs(store, rows)
    rounds = {name: {} for name in [*streaming, *runs]}
    tables = {name: offline.acceptances(rows, per_row, gammas, group=group, rounds_out=rounds[name])
              for name, per_row in runs.items()}
    tables |= {d.name: offline.streaming_acceptances(d, store, rows, gammas, group, rounds[d.name])
               for d in drafters if d.name in streaming}
    tables = {name: tables[name] for name in rounds}      # the report's order: its drafters, then the baselines
    tree_report = tree_tables(drafters, store, rows, gammas, tree, tables, rounds) if tree.on else None
    results = {name: {str(g): a.summary() for g, a in t["all"].items()} for name, t in tables.items()}
    durations = sorted({r.duration for r in rows if r.duration})
    by_duration = {}
    if len(durations) > 1:  # e.g. DSEC 1 s vs 500 ms clips, at the largest gamma
        by_duration = {d: {name: t[d][gammas[-1]].summary() for name, t in tables.items() if gammas[-1] in t[d]}
                       for d in durations}
    report = {"mode": "offline", "split": split, "gammas": gammas, "store": str(store_path),
              "by_duration": by_duration,
              "store_identity": {k: store.manifest.get(k) for k in ("kind", "target", "draft", "layers")},
              "drafter": drafter, "no_draft": no_draft, "results": results,
              "notes": [n for d in drafters for n in d.notes] + tree_notes(tree, temperature),
              "rounds_trace": {name: rounds_trace(r) for name, r in rounds.items()}}
    if tree_report:
        report["tree"] = tree_report
    report["projected_by_schedule"] = offline.schedule_section(drafters, rows, results, gammas)
    if temperature and store.has_hidden:
        report["sampling"] = {d.name: {"temperature": temperature, "expected_alpha": offline.expected_sampling_acceptance(
            store, rows, offline.drafter_logprobs(d, store), temperature)} for d in drafters}
    return report


def check_tree_drafters(drafters: list, tree: TreeSpec) -> None:
    """A tree needs a drafter with a distribution (not the baselines' token lists)."""
    if tree.on and not drafters:
        check_tree_drafter(None, RAW_DRAFT, tree)
    for d in drafters:
        check_tree_drafter(d.model, d.name, tree)


def tree_tables(drafters: list, store: FeatureStore, rows: list, gammas: list[int], tree: TreeSpec,
                tables: dict, rounds: dict) -> dict:
    """Adds "<name>+tree" beside each drafter's chain in `tables` and `rounds` (in place, each right after its
    chain) -> the report's `tree` section: budget, top-k and per name and gamma the mean nodes per round."""
    width = {}
    for d in drafters:
        name, per_gamma = d.name + TREE_SUFFIX, {}
        for g in tree.depths(gammas):
            per_gamma[g], nodes = offline.drafter_tree_rounds(d, store, rows, g, tree)
            width.setdefault(name, {})[str(g)] = sum(nodes) / max(len(nodes), 1)
        tables[name] = offline.round_tables(rows, per_gamma, group=lambda r: r.duration)
        rounds[name] = per_gamma
    order = [n for name in tables if not name.endswith(TREE_SUFFIX) for n in (name, name + TREE_SUFFIX) if n in tables]
    for table in (tables, rounds):
        table.update({n: table.pop(n) for n in order})
    return {"budget": tree.budget, "topk": tree.topk, "width": width}


@hydra_stage("evaluate")
def main(cfg: DictConfig) -> dict:
    gammas = gammas_of(cfg.gamma)
    tree = tree_spec(cfg.get("tree"), gammas)
    if cfg.mode == "offline" and not cfg.drafter:     # refused before anything is written
        check_tree_drafters([], tree)
    claim_output(cfg.out, "evaluate", evaluate_identity(cfg))
    if cfg.mode == "offline":
        report = evaluate_offline(cfg.store, cfg.split, gammas, cfg.drafter, cfg.no_draft, cfg.temperature,
                                  cfg.get("allow_store_mismatch", False), tree)
    elif cfg.mode == "online":
        from specalign.specdec.online_eval import evaluate_online

        report = evaluate_online(cfg, gammas)
    else:
        raise SpecalignError(f"mode must be offline or online, got {cfg.mode!r}")
    report["config"] = OmegaConf.to_container(cfg, resolve=True)
    out = write_report(report, cfg.out)
    print((Path(out) / "report.md").read_text())
    print(f"report written to {out}")
    return report
