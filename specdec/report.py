"""Reports: report.json (machine-readable), report.md (a table to paste) and plots.

Structure of report.json:

    {"config": {...}, "store": {...manifest identity...}, "split": "test", "gammas": [..],
     "results": {name: {"<gamma>": {tau, alpha, alpha_at, rounds, tokens, samples, ...}}},
     "sampling": {name: {"temperature": T, "expected_alpha": x}},   # optional
     "rounds_trace": {name: {"<gamma>": [[accepted draft tokens of each round] per request]}},
     "tree": {budget, topk, width: {"<name>+tree": {"<gamma>": mean nodes per round}}},   # tree.budget > 0
     # offline, drafters with a draft schedule (specdec/schedule.py): the end-to-end speedup it projects
     "projected_by_schedule": {name: {schedule, costs, mean_tokens, mean_draft, projected_e2e: {"<gamma>": x}}},
     # online mode (specdec/online_eval.py):
     "costs": {"target": {prefill_s, decode_s, tokens_per_s, verify_s: {"<gamma>": s}},
               "draft": {prefill_s, decode_s, tokens_per_s},
               "drafters": {name: {"<gamma>": {setup_s, round_s, step_s, tokens_per_s}}}},
     "speedup": {name: {"<gamma>": {projected, projected_e2e, wall_clock}}},
     "schedules": {name: "sequential" | "concurrent" | "none"},   # when it reads EventGPT's response
     "prefill_hiding": {gap_s, draft_step_s, tokens_fit, accepted, fit_total, accepted_total, accept_rate},
     "checks": {requests, target_greedy_equals_store, draft_greedy_equals_store,
                online_equals_target_greedy: {name: {"<gamma>": count}}},
     # online mode with temperature=T: measured speculative sampling beside the offline expectation
     "sampling_online": {name: {"<gamma>": {tau, alpha, alpha_at, rounds, tokens, ..., temperature, top_p,
                                            seed, expected_alpha (or null)}}}}
"""

from __future__ import annotations

from pathlib import Path

from specalign.io import atomic_path, write_json, write_text

# The baselines every report shows beside its drafters (specdec/offline.py, specdec/online_eval.py)
RAW_DRAFT = "raw_draft"       # the draft model's own free-running greedy tokens, proposed position by position
DRAFT_MODEL = "draft_model"   # the draft model as an ordinary draft model
BASELINES = (RAW_DRAFT, DRAFT_MODEL)
STORED = "stored:"            # prefix of the token lists stored with the pairs (e.g. an earlier adapter's)
TREE_SUFFIX = "+tree"         # a drafter's draft-tree row beside its chain row (specdec/tree.py)


def is_baseline(name: str) -> bool:
    return name in BASELINES or name.startswith(STORED)


def entry_label(report: str, name: str) -> str:
    """The name of a report's entry across reports: a baseline by its own name, the report's drafter by the
    report's (its tree "<report>+tree"), its other drafters as "<report> (<name>)" (e.g. "token_adapter (no_draft)")."""
    if name == "drafter" + TREE_SUFFIX:
        return report + TREE_SUFFIX
    return name if is_baseline(name) else report if name == "drafter" else f"{report} ({name})"


def markdown_table(report: dict) -> str:
    gammas = report["gammas"]
    lines = [f"# Acceptance on `{report.get('split', 'all')}` ({report.get('mode', 'offline')})", ""]
    head = "| drafter | " + " | ".join(f"τ (γ={g}) | α (γ={g})" for g in gammas) + " | samples |"
    lines += [head, "|" + "---|" * (2 * len(gammas) + 2)]
    for name, per_gamma in report["results"].items():
        cells = []
        for g in gammas:      # a tree row may cover some gammas only (tree.gammas)
            s = per_gamma.get(str(g))
            cells += [f"{s['tau']:.3f}", f"{s['alpha']:.3f}"] if s else ["–", "–"]
        samples = next(iter(per_gamma.values()))["samples"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {samples} |")
    g0 = gammas[-1]
    lines += ["", f"α_k at γ={g0} (accepted at position k / rounds that reached k):", "",
              "| drafter | " + " | ".join(f"k={k}" for k in range(g0)) + " |", "|" + "---|" * (g0 + 1)]
    for name, per_gamma in report["results"].items():
        if str(g0) not in per_gamma:
            continue
        at = per_gamma[str(g0)]["alpha_at"]
        lines.append(f"| {name} | " + " | ".join("–" if a is None else f"{a:.3f}" for a in at) + " |")
    if report.get("by_duration"):
        lines += ["", f"By clip duration (γ={g0}):", "", "| drafter | " + " | ".join(
            f"τ ({d}) | α ({d})" for d in report["by_duration"]) + " |",
            "|" + "---|" * (2 * len(report["by_duration"]) + 1)]
        for name in report["results"]:
            cells = []
            for per_name in report["by_duration"].values():
                s = per_name.get(name)
                cells += [f"{s['tau']:.3f}", f"{s['alpha']:.3f}"] if s else ["–", "–"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report.get("tree"):
        lines += tree_lines(report["tree"])
    if report.get("sampling"):
        lines += ["", "Expected acceptance under speculative sampling (mean Σ min(p, q) per position):", "",
                  "| drafter | temperature | expected α |", "|---|---|---|"]
        for name, s in report["sampling"].items():
            lines.append(f"| {name} | {s['temperature']} | {s['expected_alpha']:.3f} |")
    if report.get("sampling_online"):
        lines += sampling_online_table(report["sampling_online"])
    if report.get("costs"):
        lines += cost_tables(report["costs"])
    if report.get("speedup"):
        lines += speedup_table(report["speedup"], report.get("schedules") or {})
    if report.get("projected_by_schedule"):
        lines += schedule_table(report["projected_by_schedule"])
    if report.get("prefill_hiding"):
        lines += prefill_hiding_lines(report["prefill_hiding"])
    if report.get("notes"):
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def tree_lines(tree: dict) -> list[str]:
    """Draft trees beside their chains: the verification width (nodes per round) each pays."""
    gammas = sorted({g for w in tree["width"].values() for g in w}, key=int)
    lines = ["", (f"Draft trees (`<drafter>+tree`): EAGLE-2 dynamic trees of depth γ, at most {tree['budget']} nodes, "
                  f"top-{tree['topk']} children of the best nodes per depth. Width = draft tokens the target verifies "
                  "per round (a chain verifies γ):"), "",
             "| drafter | " + " | ".join(f"width (γ={g})" for g in gammas) + " |", "|" + "---|" * (len(gammas) + 1)]
    for name, per_gamma in tree["width"].items():
        lines.append(f"| {name} | " + " | ".join(_num(per_gamma.get(g), ".1f") for g in gammas) + " |")
    return lines


def _num(v: float | None, spec: str = ".3g") -> str:
    return "–" if v is None else format(v, spec)


def sampling_online_table(sampling: dict) -> list[str]:
    """Online speculative sampling: measured τ, α (over the sampled outputs) beside the offline expected α."""
    lines = ["", ("Online speculative sampling (measured over the sampled outputs; expected α: offline mean "
                  "Σ min(p, q) per position along the target's greedy responses):"), "",
             "| drafter | γ | temperature | τ | α | expected α | rounds | tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for name, per_gamma in sampling.items():
        for g, s in per_gamma.items():
            temp = f"{s['temperature']:g}" + (f" (top-p {s['top_p']:g})" if s.get("top_p", 1.0) < 1 else "")
            lines.append(f"| {name} | {g} | {temp} | {s['tau']:.3f} | {s['alpha']:.3f} "
                         f"| {_num(s.get('expected_alpha'), '.3f')} | {s['rounds']} | {s['tokens']} |")
    return lines


def cost_tables(costs: dict) -> list[str]:
    t, d = costs["target"], costs["draft"]
    lines = ["", "Measured per-call costs (seconds, means over the requests):", "", "| call | seconds |", "|---|---|",
             f"| target prefill | {_num(t['prefill_s'])} |", f"| target decode step | {_num(t['decode_s'])} |"]
    lines += [f"| target verification of γ+1 tokens (γ={g}) | {_num(v)} |" for g, v in t["verify_s"].items()]
    lines += [f"| draft prefill | {_num(d['prefill_s'])} |", f"| draft decode step | {_num(d['decode_s'])} |", "",
              f"Plain greedy decoding: target {t['tokens_per_s']:.1f} tokens/s, draft {d['tokens_per_s']:.1f} tokens/s.",
              "", "| drafter | γ | setup s | drafting s / round | s / drafted token | tokens/s |", "|---|---|---|---|---|---|"]
    for name, per_gamma in costs["drafters"].items():
        for g, c in per_gamma.items():
            lines.append(f"| {name} | {g} | {_num(c['setup_s'])} | {_num(c['round_s'])} | {_num(c['step_s'])} "
                         f"| {c['tokens_per_s']:.1f} |")
    return lines


def speedup_table(speedup: dict, schedules: dict | None = None) -> list[str]:
    lines = ["", ("Speedup over plain target decoding: projected = τ·t_decode / (t_verify(γ) + t_round); end to "
                  "end adds the target prefill and the drafter's setup over the mean response; wall clock is measured. "
                  "Schedule: when a drafter reads EventGPT's response (sequential: generated before the target "
                  "starts, paid in its setup; concurrent: streamed in beside the target, each round sees what exists, "
                  "nothing paid up front; none: reads none)."),
             "",
             "| drafter | schedule | γ | projected | projected end to end | wall clock |", "|---|---|---|---|---|---|"]
    for name, per_gamma in speedup.items():
        for g, s in per_gamma.items():
            cells = [_num(s[k], ".2f") + ("x" if s[k] is not None else "")
                     for k in ("projected", "projected_e2e", "wall_clock")]
            lines.append(f"| {name} | {(schedules or {}).get(name, '–')} | {g} | " + " | ".join(cells) + " |")
    return lines


def schedule_table(by_schedule: dict) -> list[str]:
    """Offline: each drafter's draft schedule and the end-to-end speedup it projects under it."""
    first = next(iter(by_schedule.values()))
    costs = ", ".join(f"{k[:-2]} {v * 1e3:.3g} ms" for k, v in first["costs"].items())
    gammas = list(first["projected_e2e"])
    lines = ["", ("Projected end-to-end speedup under each drafter's draft schedule (docs/design.md §10; sequential "
                  "pays EventGPT's whole response up front, concurrent nothing), over mean responses of "
                  f"{first['mean_tokens']:.1f} tokens and drafts of {first['mean_draft']:.1f}, at the costs {costs}:"),
             "", "| drafter | schedule | " + " | ".join(f"end to end (γ={g})" for g in gammas) + " |",
             "|---|---|" + "---|" * len(gammas)]
    for name, s in by_schedule.items():
        cells = [_num(s["projected_e2e"].get(g), ".2f") + "x" for g in gammas]
        lines.append(f"| {name} | {s['schedule']} | " + " | ".join(cells) + " |")
    return lines


def prefill_hiding_lines(h: dict) -> list[str]:
    return ["", ("Prefill hiding (both prefills started together): target prefill minus draft prefill "
                 f"{_num(h['gap_s'])} s, draft decode step {_num(h['draft_step_s'])} s; "
                 f"{_num(h['tokens_fit'])} draft tokens fit in the gap per request ({h['fit_total']} in all), "
                 f"of which the target accepts {_num(h['accepted'])} ({h['accepted_total']} in all, "
                 f"rate {_num(h['accept_rate'])}).")]


def plot_report(report: dict, out_dir: Path) -> list[Path]:
    from matplotlib.figure import Figure  # a figure of its own canvas: no pyplot state, no backend switch

    paths = []
    g0 = report["gammas"][-1]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, per_gamma in report["results"].items():
        if str(g0) not in per_gamma:
            continue
        at = per_gamma[str(g0)]["alpha_at"]
        ks = [k for k, a in enumerate(at) if a is not None]
        ax.plot([k + 1 for k in ks], [at[k] for k in ks], marker="o", label=name)
    ax.set(xlabel="draft position k", ylabel="α_k", title=f"acceptance by position (γ={g0})", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "alpha_by_position.png"))
    if len(report["gammas"]) > 1:
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for name, per_gamma in report["results"].items():
            gs = [g for g in report["gammas"] if str(g) in per_gamma]
            ax.plot(gs, [per_gamma[str(g)]["tau"] for g in gs], marker="o", label=name)
        ax.set(xlabel="γ (draft tokens per round)", ylabel="τ (tokens per round)", title="mean accepted length")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir / "tau_by_gamma.png"))
    return paths


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def write_report(report: dict, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", markdown_table(report))
    plot_report(report, out_dir)
    return out_dir
