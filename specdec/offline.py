"""Offline simulation of greedy speculative decoding over a feature store.

For greedy decoding the whole process is fixed by the target's greedy response r, so the
rounds can be replayed exactly without the 7B target (docs/design.md).

Every drafter is scored from its runs (specdec/metrics.py): at each position p, how many of the
tokens it proposes from the prefix r[:p] the target accepts. A drafter's runs at every position of
many responses come from a few batched forwards (`chain_runs` of its type, adapters/registry.py);
a baseline that proposes a token list (the raw draft, the draft model's teacher-forced greedy
predictions, stored lists) gives its runs by comparing the list with r. The rounds of each gamma are
then walked from the runs, exactly the rounds of a round-by-round simulation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from specalign.data.features import feature_name
from specalign.data.store import FeatureStore, Row
from specalign.specdec.drafters import ReportDrafter
from specalign.specdec.metrics import (
    Acceptance,
    Round,
    expected_accept,
    rounds_from_runs,
    simulate_rounds,
    token_runs,
)
from specalign.specdec.report import DRAFT_MODEL, RAW_DRAFT, STORED
from specalign.specdec.schedule import CONCURRENT, e2e_speedup
from specalign.specdec.tree import TreeSpec, grow, round_counts

Runs = tuple[list[int], list[int]]      # run [n], cap [n] of one response

TOKENS_PER_BATCH = 2048   # responses are batched up to this many padded tokens (a [tokens, V] float block)


def head_logits(store: FeatureStore, row: Row, model: str, heads: dict | None = None) -> torch.Tensor:
    """Logits recomputed from the stored final-norm rows and LM head: [n, V]."""
    heads = heads if heads is not None else store.heads()
    final = store.hidden(row, feature_name(model, None)).float()
    return final @ heads[f"{model}.lm_head"].float().T


def batches_of(rows: Sequence[Row], tokens: int = TOKENS_PER_BATCH) -> Iterable[list[int]]:
    """Indices of `rows` in batches of similar length, each at most `tokens` padded tokens (one row at least)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].target_tokens))
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * len(rows[i].target_tokens) > tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.no_grad()
def drafter_runs(d: ReportDrafter, store: FeatureStore, rows: Sequence[Row], depth: int) -> list[Runs]:
    """Every row's runs of a drafter (greedy chains counted to `depth`), in batched forwards."""
    d.kind.check_store(d.model, store)
    device = next(d.model.parameters()).device
    out: list[Runs] = [([], [])] * len(rows)
    for index in batches_of(rows):
        batch = d.kind.batch(d.model, store, [rows[i] for i in index], **d.options)
        runs = d.model.chain_runs({k: v.to(device) for k, v in batch.items()}, depth)
        for b, i in enumerate(index):
            out[i] = runs.row(b, len(rows[i].target_tokens))
    return out


def drafter_logprobs(d: ReportDrafter, store: FeatureStore) -> Callable[[Row], torch.Tensor]:
    """row -> the drafter's teacher-forced log-probabilities [n, V] (row j after r[:j])."""
    device = next(d.model.parameters()).device

    @torch.no_grad()
    def logprobs(row: Row) -> torch.Tensor:
        batch = d.kind.batch(d.model, store, [row], **d.options)
        return d.model.next_logprobs({k: v.to(device) for k, v in batch.items()})[0].float()

    return logprobs


def baseline_runs(store: FeatureStore, rows: Sequence[Row]) -> dict[str, list[Runs]]:
    """The baselines every report shows, each row's runs: the raw draft tokens, and (full stores) the draft
    model used as an ordinary draft model (its greedy predictions after each target prefix); stored
    token lists from earlier research are scored too."""
    out = {RAW_DRAFT: [token_runs(r.draft_tokens, r.target_tokens) for r in rows]}
    if store.has_hidden:
        out[DRAFT_MODEL] = [token_runs(p, r.target_tokens) for p, r in zip(head_predictions(store, rows, "draft"), rows)]
    extra_lists = sorted({k for r in store.rows for k, v in r.extra.items()
                          if k.endswith("_tokens") and isinstance(v, list)})
    for k in extra_lists:
        out[f"{STORED}{k}"] = [token_runs(r.extra.get(k, []), r.target_tokens) for r in rows]
    return out


def head_predictions(store: FeatureStore, rows: Sequence[Row], model: str) -> list[list[int]]:
    """Greedy next-token ids of `model` ("target" or "draft") at every feature row of each row, from the
    stored final-norm rows and LM head (rows batched into one matmul per TOKENS_PER_BATCH tokens)."""
    head, name, out = store.heads()[f"{model}.lm_head"].float(), feature_name(model, None), [[]] * len(rows)
    for index in batches_of(rows):
        final = torch.cat([store.hidden(rows[i], name) for i in index]).float()        # [tokens, H]
        preds = (final @ head.T).argmax(-1).split([len(rows[i].target_tokens) for i in index])
        for i, p in zip(index, preds):
            out[i] = p.tolist()
    return out


def acceptances(rows: Sequence[Row], runs: Sequence[Runs], gammas: Sequence[int],
                group: Callable[[Row], str | None] | None = None,
                rounds_out: dict[int, list] | None = None) -> dict[str, dict[int, Acceptance]]:
    """{"all" | group: {gamma: Acceptance}} from each row's runs (one drafter pass serves every gamma
    and the row's group table). `rounds_out` collects {gamma: per row its rounds}."""
    tables: dict[str, dict[int, Acceptance]] = {}
    for row, (run, cap) in zip(rows, runs):
        keys = {"all"} | ({group(row)} if group and group(row) else set())
        for g in gammas:
            rounds = rounds_from_runs(run, cap, len(row.target_tokens), g)
            if rounds_out is not None:
                rounds_out.setdefault(g, []).append(rounds)
            for k in keys:
                tables.setdefault(k, {}).setdefault(g, Acceptance(g)).add_sample(rounds)
    return tables


def expected_sampling_acceptance(store: FeatureStore, rows: Iterable[Row],
                                 drafter_logits: Callable[[Row], torch.Tensor], temperature: float = 1.0) -> float:
    """Mean over response positions of sum_x min(p(x), q(x)), p the target's and q the drafter's
    distribution at temperature T (the acceptance probability of one speculative-sampling step)."""
    total, count = 0.0, 0
    heads = store.heads()
    for row in rows:
        p = torch.softmax(head_logits(store, row, "target", heads) / temperature, -1)
        q = torch.nan_to_num(torch.softmax(drafter_logits(row).float() / temperature, -1), nan=0.0)
        n, v = min(p.shape[0], q.shape[0]), min(p.shape[-1], q.shape[-1])   # a drafter may stop at its max_len
        p, q = p[:n, :v], q[:n, :v]
        total += float(expected_accept(p, q).sum())
        count += p.shape[0]
    return total / max(count, 1)


@torch.no_grad()
def drafter_tree_rounds(d: ReportDrafter, store: FeatureStore, rows: Sequence[Row], gamma: int,
                        spec: TreeSpec) -> tuple[list[list[Round]], list[int]]:
    """Every row's rounds with draft trees of depth gamma (specdec/tree.py), walked round by round: at each
    round start the drafter grows its tree from the target's prefix, and the round accepts the tree's longest
    root path equal to the target's tokens. Trees are grown to depth gamma also near the end of a response,
    as online (where the end is not known). -> (rounds per row, nodes of every tree)."""
    d.kind.check_store(d.model, store)
    out, widths = [], []
    for row in rows:
        context, r = d.kind.row_context(d.model, store, row, **d.options), list(row.target_tokens)

        def counts(p: int, context=context, r=r) -> tuple[int, int]:
            tree = grow(lambda paths: d.model.tree_logprobs(context, r[:p], paths), gamma, spec.budget, spec.topk)
            widths.append(len(tree))
            return round_counts(tree, r, p)

        out.append(simulate_rounds(len(r), counts))
    return out, widths


def round_tables(rows: Sequence[Row], rounds: dict[int, list[list[Round]]],
                 group: Callable[[Row], str | None] | None = None) -> dict[str, dict[int, Acceptance]]:
    """{"all" | group: {gamma: Acceptance}} from each row's rounds per gamma (as `acceptances` from runs)."""
    tables: dict[str, dict[int, Acceptance]] = {}
    for g, per_row in rounds.items():
        for row, row_rounds in zip(rows, per_row):
            for k in {"all"} | ({group(row)} if group and group(row) else set()):
                tables.setdefault(k, {}).setdefault(g, Acceptance(g)).add_sample(row_rounds)
    return tables
# ------------------------------------------------------------------------------ draft schedules (specdec/schedule.py)

def runs_per_gamma(d: ReportDrafter) -> bool:
    """A drafter reading EventGPT's response as it streams in: which tokens a round sees depends on the round
    index, so its chains differ per gamma."""
    return d.kind.schedule(d.model, **d.options) == CONCURRENT


def streaming_acceptances(d: ReportDrafter, store: FeatureStore, rows: Sequence[Row], gammas: Sequence[int],
                          group: Callable[[Row], str | None] | None = None,
                          rounds_out: dict[int, list] | None = None) -> dict[str, dict[int, Acceptance]]:
    """`acceptances` of a streaming drafter: its runs computed per gamma (the exact walk of each)."""
    tables: dict[str, dict[int, Acceptance]] = {}
    for g in gammas:
        for key, per_gamma in acceptances(rows, drafter_runs(d, store, rows, g), [g], group, rounds_out).items():
            tables.setdefault(key, {})[g] = per_gamma[g]
    return tables


def schedule_section(drafters: Sequence[ReportDrafter], rows: Sequence[Row], results: dict,
                     gammas: Sequence[int]) -> dict:
    """name -> the draft schedule each report drafter assumes (sequential | concurrent | none) and its projected
    end-to-end speedup under it (specdec/schedule.e2e_speedup) from the costs the report's first such drafter
    was trained for (its `stream_costs`, one set for the whole table), over the rows' mean response and draft lengths."""
    drafters = [d for d in drafters if hasattr(d.model, "stream_costs")]     # drafters with a draft schedule
    if not drafters or not rows:
        return {}
    costs = drafters[0].model.stream_costs
    n = sum(len(r.target_tokens) for r in rows) / len(rows)
    m = sum(len(r.draft_tokens) for r in rows) / len(rows)
    out = {}
    for d in drafters:
        schedule = d.kind.schedule(d.model, **d.options)
        out[d.name] = {"schedule": schedule or "none", "costs": costs.to_dict(), "mean_tokens": n, "mean_draft": m,
                       "projected_e2e": {str(g): e2e_speedup(results[d.name][str(g)]["tau"], n, costs, schedule, m)
                                         for g in gammas if results[d.name][str(g)]["tau"] > 0}}
    return out
