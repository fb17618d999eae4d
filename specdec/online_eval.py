"""`specalign evaluate mode=online`: real speculative decoding with the two VLMs, one request at a time.

For each request of the store's split (rebuilt from the dataset: sample id and question of each row),
the target (Video-LLaVA, with its video) is prefilled and decoded by `specdec.online.speculative_generate`
with each drafter:
- `raw_draft`: EventGPT's own free-running greedy response, proposed position by position;
- `draft_model`: EventGPT as an ordinary draft model (its event prefill, KV cache rolled back each round);
- the exported drafter, of any registered type (adapters/registry.py; the TokenAdapter on EventGPT's
  response, EAGLE-3 on the target's and/or EventGPT's features) run by specdec/online_drafters.py, and
  `no_draft` when given (or the variant its type makes without the draft: the TokenAdapter's
  draft-removed ablation).
Plain greedy decoding of both models (`greedy_generate`) gives the reference output, EventGPT's response
and the per-call costs. Both models decode on the engine `engine.*` selects (`use_engines`; by default the
static engine of specdec/engine.py, with CUDA graphs and fused kernels on CUDA, the exported drafters' rounds
on static shapes too), so every speedup is against plain greedy decoding on that same engine. Acceptance comes from the engine's rounds (`metrics.Round`), so for greedy
decoding it must equal the offline simulation over the same store rows; `checks` counts the requests
whose online output equals plain greedy decoding, and whose greedy responses equal the store's.

Projected speedup, end-to-end speedup, wall clock and prefill hiding follow the cost model of
docs/design.md ("Online decoding, the engine and the cost model"): `projected_speedup` and `prefill_hiding`
below compute exactly those formulas from the per-call costs measured in the same run.

Speculative sampling (`temperature=T`, optional `top_p`, `seed`): besides the greedy runs, every drafter
also decodes every request with speculative sampling (`sampling_entries`: the same drafters in sampling
mode, sharing their weights). The TokenAdapter and EAGLE-3 then draw their proposals from their own
distributions at temperature T and hand q to the engine, EventGPT as a draft model samples too, and
`raw_draft` proposes its fixed greedy tokens (one-hot q). Sampling is over the ids both models read
(`VocabSampling`: ids below the smaller embedding table; Video-LLaVA's 64 extra head rows, image/video/pad
ids and padding, are no words, and EventGPT cannot embed them when they are accepted); speculative
sampling leaves that target distribution unchanged. The draws come from one CPU generator, re-seeded
from (seed, request) before each run, so every drafter and gamma meets the same seed on a request and a
run does not depend on which other drafters are in the report. Acceptance is measured from the engine's
rounds against each sampled output (`report["sampling_online"][name][gamma]`); beside it, the offline
expected acceptance, the mean over the target's greedy response positions of sum_x min(p(x), q(x)) at
temperature T (`offline.expected_sampling_acceptance`), where the store has the hidden states and the
drafter has a distribution (not `raw_draft`; top-p is not applied offline).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig
from specalign.adapters.registry import DRAFT_PREFILL, DRAFT_RESPONSE
from specalign.data.samples import Request
from specalign.data.store import FeatureStore, Row
from specalign.specdec.drafters import report_drafters
from specalign.specdec.engine import StaticDecoder
from specalign.specdec.metrics import Acceptance, first_run_matches
from specalign.specdec.online import (
    Drafter,
    GreedyResult,
    ModelDrafter,
    OnlineResult,
    Sampling,
    TokenListDrafter,
    greedy_generate,
    make_engine,
    speculative_generate,
    tree_generate,
)
from specalign.specdec.online_drafters import OnlineDrafter
from specalign.specdec.replay import rounds_trace
from specalign.specdec.report import DRAFT_MODEL, RAW_DRAFT
from specalign.specdec.schedule import CONCURRENT, SEQUENTIAL
from specalign.specdec.tree import TREE_SUFFIX, TreeSpec, check_tree_drafter, tree_notes, tree_spec
from torch import Tensor

from specalign.errors import DataError, SpecalignError
from specalign.runtime import derived_seed

log = logging.getLogger("specalign.evaluate")


@dataclass
class Prepared:
    """One request, prefilled and decoded plainly by both models."""

    row: Row
    target_prefill: dict
    draft_prefill: dict
    greedy: GreedyResult    # plain target decoding: the reference output and its per-call costs
    draft: GreedyResult     # EventGPT's free-running greedy response and its per-call costs


# what an entry's drafter reads per sequence (adapters/registry.py) -> where a prepared request has it
REQUESTS: dict[str | None, Callable[[Prepared], Any]] = {
    DRAFT_RESPONSE: lambda p: p.draft.tokens, DRAFT_PREFILL: lambda p: p.draft_prefill, None: lambda p: None}


@dataclass
class Entry:
    """A drafter of the report and what it reads per sequence (the engine's `request`, the target's hidden
    states)."""

    drafter: Drafter
    request: str | None = None            # DRAFT_RESPONSE | DRAFT_PREFILL | None
    hidden_layers: Sequence[int] = ()
    runs: dict[int, list[OnlineResult]] = field(default_factory=dict)
    tree: TreeSpec | None = None          # draft trees (specdec/tree.py) instead of chains
    schedule: str | None = None           # when it reads EventGPT's response (specdec/schedule.py); None: never

    @property
    def reads_draft_response(self) -> bool:
        """Its input, EventGPT's response, is generated before the run (part of its setup cost), unless it
        streams in beside the target (the concurrent schedule: EventGPT on its own device, nothing up front)."""
        return self.request == DRAFT_RESPONSE and self.schedule != CONCURRENT

    def request_of(self, p: Prepared) -> Any:
        return REQUESTS[self.request](p)


# ----------------------------------------------------------------------------- requests

def load_samples(cfg: DictConfig, store: FeatureStore) -> dict:
    """{sample id: Sample} from `cfg.data` (a conf/data entry), else from the datasets the store records."""
    from specalign.data.layouts import load_from_config, load_recorded

    if cfg.get("data"):
        samples, _ = load_from_config(cfg.data)
        return {s.id: s for s in samples}
    datasets = store.manifest.get("datasets") or ([store.manifest["data"]] if store.manifest.get("data") else [])
    if not datasets:
        raise DataError(store.root / "manifest.json", "no dataset recorded",
                        "pass data=<conf/data entry> data.root=/path/to/the/dataset")
    samples = []
    for d in datasets:  # every dataset extracted into the store (e.g. 1 s and 500 ms clips)
        samples += load_recorded(d, store.manifest.get("questions"))
    return {s.id: s for s in samples}


def requests_of_rows(rows: list[Row], samples: dict) -> list[Request]:
    missing = [r.sample_id for r in rows if r.sample_id not in samples]
    if missing:
        raise DataError(missing[0], f"{len(missing)} store rows have no sample in the dataset",
                        "give the dataset the store was extracted from (data.root=...)")
    return [Request(samples[r.sample_id], r.question_id, r.question) for r in rows]


def engine_of(backend):
    """The backend's model as the online engine decodes it: its `engine` (set by `use_engines`), else the model."""
    return backend.engine if backend.engine is not None else backend.model


def use_engines(cfg: DictConfig, backends, max_new_tokens: int, gammas: list[int], tree: TreeSpec | None = None
                ) -> None:
    """`engine.*` (kind static | dynamic, cuda_graphs, max_len) for both models; a static cache keeps room for
    the answer and one verification of the largest gamma, or of a tree (1 + tree.budget tokens), and replays
    every verification width up to that as a graph."""
    e = cfg.get("engine") or {}
    widest = max(max(gammas), tree.budget if tree else 0) + 1
    for b in backends:
        b.engine = make_engine(b.model, e.get("kind", "static"), max_new_tokens + widest, e.get("max_len"),
                               e.get("cuda_graphs"), e.get("compile"), max(9, widest))


def prefill_spec(batch) -> dict:
    """The engine's prefill of a one-request Batch: prompt and pixel values, logits of the last position."""
    return {**batch.inputs, "logits_to_keep": 1}


def prepare(target, draft, row: Row, request: Request, max_new_tokens: int, eos: dict) -> Prepared:
    tp, dp = prefill_spec(target.prepare([request])), prefill_spec(draft.prepare([request]))
    return Prepared(row, tp, dp, greedy_generate(engine_of(target), tp, max_new_tokens, eos["target"]),
                    greedy_generate(engine_of(draft), dp, max_new_tokens, eos["draft"]))


# ----------------------------------------------------------------------------- drafters

def baseline_entries(draft) -> dict[str, Entry]:
    return {RAW_DRAFT: Entry(TokenListDrafter(), DRAFT_RESPONSE, schedule=SEQUENTIAL),
            DRAFT_MODEL: Entry(ModelDrafter(engine_of(draft)), DRAFT_PREFILL)}


def all_entries(cfg: DictConfig, target, draft, tree: TreeSpec | None = None) -> tuple[dict[str, Entry], list[str]]:
    """The report's drafters (specdec/drafters.py: `drafter`, `no_draft`), each followed by "<name>+tree" when
    `tree` is on, then the baselines. On the static engine the drafters' greedy rounds run on static shapes
    too, where their type offers it."""
    entries, tree = {}, tree or TreeSpec()
    drafters = report_drafters(cfg.drafter, cfg.no_draft, "online", cfg.device)
    for d in drafters:
        check_tree_drafter(d.model, d.name, tree)
    static = target.engine if isinstance(target.engine, StaticDecoder) else None
    for d in drafters:
        inputs = partial(d.kind.online_inputs, d.model, engine_of(draft), **d.options)
        fast = d.kind.static_proposer(d.model, static.cuda_graphs, static.compile) if static else None
        drafter = OnlineDrafter(d.model, inputs, static=fast)
        entries[d.name] = Entry(drafter, drafter.request, drafter.hidden_layers, schedule=drafter.inputs.schedule)
        if tree.on:     # the same drafter growing trees, eagerly, beside its chain
            eager = OnlineDrafter(d.model, inputs)
            entries[d.name + TREE_SUFFIX] = Entry(eager, eager.request, eager.hidden_layers, tree=tree)
    return {**entries, **baseline_entries(draft)}, [n for d in drafters for n in d.notes]


def run_entry(target, entry: Entry, p: Prepared, gamma: int, max_new_tokens: int, eos,
              sampling: Sampling | None = None, generator: torch.Generator | None = None) -> OnlineResult:
    if entry.tree is not None:
        return tree_generate(engine_of(target), p.target_prefill, entry.drafter, gamma=gamma, tree=entry.tree,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, hidden_layers=entry.hidden_layers,
                             request=entry.request_of(p))
    return speculative_generate(engine_of(target), p.target_prefill, entry.drafter, gamma=gamma,
                                max_new_tokens=max_new_tokens, eos_token_id=eos, sampling=sampling,
                                generator=generator, hidden_layers=entry.hidden_layers, request=entry.request_of(p))


# ----------------------------------------------------------------------------- speculative sampling

@dataclass(frozen=True)
class VocabSampling(Sampling):
    """`Sampling` over ids < vocab only (logits of the ids above are dropped before temperature and top-p)."""

    vocab: int | None = None

    def probs(self, logits: Tensor) -> Tensor:
        if self.vocab is not None and logits.shape[-1] > self.vocab:
            logits = logits.float().clone()
            logits[..., self.vocab:] = float("-inf")
        return super().probs(logits)


def sampling_of(cfg: DictConfig, vocab: int | None = None) -> VocabSampling | None:
    """`temperature` (null or 0: greedy only), an optional `top_p`, over ids < vocab."""
    t = cfg.get("temperature")
    if t is None or float(t) == 0.0:
        return None
    top_p = float(cfg.get("top_p") or 1.0)
    if float(t) < 0 or not 0.0 < top_p <= 1.0:
        raise SpecalignError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {t!r} and {top_p!r}")
    return VocabSampling(float(t), top_p, vocab)


def shared_vocab(target, draft) -> int:
    """The ids both models can embed: a sampled target token is fed to EventGPT when it drafts."""
    return min(target.embed_weight().shape[0], draft.embed_weight().shape[0])


def sampling_entries(entries: dict[str, Entry], sampling: Sampling, generator: torch.Generator) -> dict[str, Entry]:
    """The same drafters (shared weights) drawing their proposals from their distribution q, which they return."""
    return {name: replace(e, drafter=e.drafter.sampled(sampling, generator), runs={}) for name, e in entries.items()}


def expected_acceptance(cfg: DictConfig, store: FeatureStore, rows: list[Row], temperature: float) -> dict:
    """name -> the offline mean of sum_x min(p(x), q(x)) over the rows' target greedy positions, for the
    drafters with a distribution the store can recompute (full stores): the report's drafters and EventGPT."""
    from specalign.specdec import offline

    if not store.has_hidden:
        return {}
    fns = {}
    for d in report_drafters(cfg.drafter, cfg.no_draft, "offline"):
        try:
            d.kind.check_store(d.model, store)
            fns[d.name] = offline.drafter_logprobs(d, store)
        except SpecalignError as e:      # e.g. an EAGLE-3 whose features the store lacks
            log.warning("no offline expected acceptance for %s: %s", d.name, e)
    fns[DRAFT_MODEL] = lambda r: offline.head_logits(store, r, "draft")
    return {name: offline.expected_sampling_acceptance(store, rows, fn, temperature) for name, fn in fns.items()}


# ----------------------------------------------------------------------------- costs

def mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def model_costs(runs: list[GreedyResult]) -> dict:
    return {"prefill_s": mean([r.prefill_s for r in runs]),
            "decode_s": mean([s for r in runs for s in r.decode_s]),
            "tokens_per_s": sum(len(r.tokens) for r in runs) / sum(r.total_s for r in runs)}


def setup_s(entry: Entry, run: OnlineResult, p: Prepared) -> float:
    return run.draft_prefill_s + (p.draft.total_s if entry.reads_draft_response else 0.0)


def drafter_costs(entry: Entry, runs: list[OnlineResult], prepared: list[Prepared]) -> dict:
    rounds = [r for run in runs for r in run.log]
    drafting = sum(r.draft_s for r in rounds)
    proposed = sum(len(r.proposal) for r in rounds)
    setups = [setup_s(entry, run, p) for run, p in zip(runs, prepared)]
    return {"setup_s": mean(setups), "round_s": drafting / len(rounds),
            "step_s": drafting / proposed if proposed else None,
            "tokens_per_s": sum(len(run.tokens) for run in runs) / (sum(run.total_s for run in runs) + sum(setups))}


def verify_costs(entries: dict[str, Entry], gammas: list[int]) -> dict[str, float | None]:
    """Mean target verification of gamma + 1 tokens, pooled over every drafter's full verifications."""
    return {str(g): mean([r.verify_s for e in entries.values() if e.tree is None for run in e.runs[g]
                          for r in run.log if r.verified == g + 1]) for g in gammas}


def tree_verify_s(runs: list[OnlineResult]) -> float | None:
    """A tree drafter's own mean verification (behind the pending bonus token: every round but the first)."""
    return mean([r.verify_s for run in runs for r in run.log if r.verified > len(r.proposal)])


def round_verify_s(entry: Entry, runs: list[OnlineResult], target: dict, gamma: int) -> float | None:
    """What the verification of one of `entry`'s rounds at `gamma` costs in the cost model: a tree's own
    (`tree_verify_s`), a chain's the γ + 1-token verification measured over the report's chains."""
    return tree_verify_s(runs) if entry.tree else target["verify_s"][str(gamma)]


def projected_speedup(tau: float, n: float, target: dict, verify: float | None, drafter: dict) -> dict:
    if verify is None or target["decode_s"] is None:
        return {"projected": None, "projected_e2e": None}
    round_s = verify + drafter["round_s"]
    plain = target["prefill_s"] + (n - 1) * target["decode_s"]
    spec = target["prefill_s"] + drafter["setup_s"] + n / tau * round_s
    return {"projected": tau * target["decode_s"] / round_s, "projected_e2e": plain / spec}


def prefill_hiding(prepared: list[Prepared], draft_step: float | None) -> dict:
    gaps = [p.greedy.prefill_s - p.draft.prefill_s for p in prepared]
    fits = [min(1 + int(gap / draft_step), len(p.draft.tokens)) if gap >= 0 and draft_step else 0
            for gap, p in zip(gaps, prepared)]
    accepted = [first_run_matches(p.draft.tokens[:k], p.greedy.tokens) for k, p in zip(fits, prepared)]
    return {"gap_s": mean(gaps), "draft_step_s": draft_step, "tokens_fit": mean(fits), "accepted": mean(accepted),
            "fit_total": sum(fits), "accepted_total": sum(accepted),
            "accept_rate": sum(accepted) / sum(fits) if sum(fits) else None}


# ----------------------------------------------------------------------------- the stage

def eos_ids(store: FeatureStore, target, draft) -> dict:
    """The store's generation setting: responses cut at EOS unless it was extracted with ignore_eos."""
    ignore = (store.manifest.get("generation") or {}).get("ignore_eos", False)
    return {"target": None if ignore else target.eos_id, "draft": None if ignore else draft.eos_id}


def max_new_tokens_of(cfg: DictConfig, store: FeatureStore) -> int:
    n = cfg.get("max_new_tokens") or (store.manifest.get("generation") or {}).get("max_new_tokens")
    if not n:
        raise SpecalignError("online mode needs max_new_tokens=N (the store records none)")
    return int(n)


def warm_up(target, draft, request: Request) -> None:
    """First calls pay one-off initialisation: keep it out of the measured costs."""
    for backend in (target, draft):
        greedy_generate(engine_of(backend), prefill_spec(backend.prepare([request])), 2)


@dataclass
class OnlineRuns:
    store: FeatureStore
    entries: dict[str, Entry]     # with their runs: entry.runs[gamma][request]
    prepared: list[Prepared]
    notes: list[str]
    sampling: VocabSampling | None = None
    seed: int = 0
    sampled: dict[str, Entry] = field(default_factory=dict)   # the entries in sampling mode, with their runs


@torch.inference_mode()
def run_online(cfg: DictConfig, gammas: list[int]) -> OnlineRuns:
    from specalign.specdec.evaluate import check_drafters
    from specalign.vlms.registry import build_backends

    if not cfg.get("models"):
        raise SpecalignError("online mode needs the models: models=<conf/models entry>, e.g. models=tiny")
    store = FeatureStore(cfg.store)
    check_drafters(store, [cfg.drafter, cfg.no_draft], cfg.get("allow_store_mismatch", False))
    rows = store.select(cfg.split)[: cfg.limit or None]
    if not rows:
        raise SpecalignError(f"{cfg.store}: split '{cfg.split}' has no rows")
    requests = requests_of_rows(rows, load_samples(cfg, store))
    tree = tree_spec(cfg.get("tree"), gammas)
    target, draft = build_backends(cfg.models, cfg.device)
    max_new, eos = max_new_tokens_of(cfg, store), eos_ids(store, target, draft)
    use_engines(cfg, (target, draft), max_new, gammas, tree)
    entries, notes = all_entries(cfg, target, draft, tree)
    sampling = sampling_of(cfg, shared_vocab(target, draft))
    seed, generator = int(cfg.get("seed") or 0), torch.Generator()
    sampled = sampling_entries({n: e for n, e in entries.items() if e.tree is None}, sampling, generator) \
        if sampling else {}
    warm_up(target, draft, requests[0])
    prepared = []
    for i, (row, request) in enumerate(zip(rows, requests)):
        prepared.append(prepare(target, draft, row, request, max_new, eos))
        for entry in entries.values():
            for g in entry.tree.depths(gammas) if entry.tree else gammas:
                entry.runs.setdefault(g, []).append(run_entry(target, entry, prepared[-1], g, max_new, eos["target"]))
        for entry in sampled.values():
            for g in gammas:
                generator.manual_seed(derived_seed(seed, i))
                entry.runs.setdefault(g, []).append(run_entry(target, entry, prepared[-1], g, max_new, eos["target"],
                                                              sampling, generator))
        log.info("online %d/%d: %s", i + 1, len(rows), row.key)
    return OnlineRuns(store, entries, prepared, notes + tree_notes(tree, cfg.get("temperature")), sampling, seed,
                      sampled)


def evaluate_online(cfg: DictConfig, gammas: list[int]) -> dict:
    return online_report(cfg, gammas, run_online(cfg, gammas))


def online_report(cfg: DictConfig, gammas: list[int], runs: OnlineRuns) -> dict:
    prepared = runs.prepared
    target, draft = model_costs([p.greedy for p in prepared]), model_costs([p.draft for p in prepared])
    target["verify_s"] = verify_costs(runs.entries, gammas)
    by = {"results": {}, "costs": {}, "speedup": {}, "same": {}}    # section -> name -> gamma -> value
    for name, e in runs.entries.items():
        for g in sorted(e.runs):
            numbers = entry_numbers(e, e.runs[g], prepared, target, round_verify_s(e, e.runs[g], target, g))
            for section, value in numbers.items():
                by[section].setdefault(name, {})[str(g)] = value
    checks = {"requests": len(prepared),
              "target_greedy_equals_store": sum(p.greedy.tokens == p.row.target_tokens for p in prepared),
              "draft_greedy_equals_store": sum(p.draft.tokens == p.row.draft_tokens for p in prepared),
              "online_equals_target_greedy": by["same"]}
    report = {"mode": "online", "split": cfg.split, "gammas": gammas, "store": str(cfg.store),
              "store_identity": {k: runs.store.manifest.get(k) for k in ("kind", "target", "draft", "layers")},
              "drafter": cfg.drafter, "no_draft": cfg.no_draft, "sample_keys": [p.row.key for p in prepared],
              "results": by["results"], "costs": {"target": target, "draft": draft, "drafters": by["costs"]},
              "speedup": by["speedup"], "schedules": {name: e.schedule or "none" for name, e in runs.entries.items()},
              "prefill_hiding": prefill_hiding(prepared, draft["decode_s"]),
              "checks": checks, "notes": runs.notes + check_notes(checks),
              "rounds_trace": {name: rounds_trace({g: [run.rounds for run in e.runs[g]] for g in sorted(e.runs)})
                               for name, e in runs.entries.items()}}
    trees = {name: e for name, e in runs.entries.items() if e.tree}
    if trees:
        t = next(iter(trees.values())).tree
        report["tree"] = {"budget": t.budget, "topk": t.topk, "width": {name: {str(g): mean(
            [len(r.proposal) for run in runs_g for r in run.log]) for g, runs_g in e.runs.items()}
            for name, e in trees.items()}, "verify_s": {name: {str(g): tree_verify_s(runs_g) for g, runs_g in
                                                             e.runs.items()} for name, e in trees.items()}}
    if runs.sampling:
        report["sampling_online"] = sampling_report(cfg, gammas, runs)
        report["notes"].append(sampling_note(runs))
    return report


def sampling_report(cfg: DictConfig, gammas: list[int], runs: OnlineRuns) -> dict:
    """name -> gamma -> measured acceptance over the sampled outputs, the sampling settings, and the offline
    expected acceptance (None where there is none)."""
    s = runs.sampling
    expected = expected_acceptance(cfg, runs.store, [p.row for p in runs.prepared], s.temperature)
    out = {}
    for name, e in runs.sampled.items():
        for g in gammas:
            acc = Acceptance(g)
            for run in e.runs[g]:
                acc.add_sample(run.rounds)
            out.setdefault(name, {})[str(g)] = {**acc.summary(), "temperature": s.temperature, "top_p": s.top_p,
                                                "vocab": s.vocab, "seed": runs.seed,
                                                "expected_alpha": expected.get(name)}
    return out


def sampling_note(runs: OnlineRuns) -> str:
    s = runs.sampling
    return (f"Speculative sampling at temperature {s.temperature}" + (f", top-p {s.top_p}" if s.top_p < 1 else "")
            + f" (seed {runs.seed}), over the {s.vocab} ids both models read: τ and α are measured over each sampled "
            "output, which is not the greedy response; expected α is the offline mean of Σ min(p, q) along the "
            "target's greedy responses (full vocabulary, no top-p).")


def entry_numbers(entry: Entry, runs: list[OnlineResult], prepared: list[Prepared], target: dict,
                  verify: float | None) -> dict:
    """One drafter at one gamma: acceptance summary, costs, speedup, runs equal to plain greedy decoding."""
    acc = Acceptance(runs[0].gamma)
    for run in runs:
        acc.add_sample(run.rounds)
    costs = drafter_costs(entry, runs, prepared)
    n_mean = mean([len(p.greedy.tokens) for p in prepared])
    speedup = {**projected_speedup(acc.tau, n_mean, target, verify, costs),
               "wall_clock": costs["tokens_per_s"] / target["tokens_per_s"]}
    return {"results": acc.summary(), "costs": costs, "speedup": speedup,
            "same": sum(run.tokens == p.greedy.tokens for run, p in zip(runs, prepared))}


def check_notes(checks: dict) -> list[str]:
    n, out = checks["requests"], []
    for key, what in (("target_greedy_equals_store", "the target's"), ("draft_greedy_equals_store", "EventGPT's")):
        if checks[key] != n:
            out.append(f"{what} greedy response differs from the store's on {n - checks[key]} of {n} requests "
                       "(other dtype, batching or prompts): online numbers are measured on the online responses.")
    for name, per_gamma in checks["online_equals_target_greedy"].items():
        for g, k in per_gamma.items():
            if k != n:
                out.append(f"'{name}' (γ={g}): online output differs from plain greedy decoding on {n - k} of {n} "
                           "requests (numerical ties between batched verification and one-token decoding).")
    return out
