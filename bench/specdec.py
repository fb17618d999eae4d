"""Speculative decoding at real scale: Video-LLaVA's wall clock with each drafter, its acceptance replayed.

    python bench/specdec.py --models tiny --device cpu                                   # tiny pair, < 1 min
    python bench/specdec.py --models real --device cuda --tau 4.1                        # one GPU, bf16
    python bench/specdec.py --models real --device cuda --trace REPORT.json              # a recorded acceptance

Both models are built at their real 7B configurations (vlms/real_configs.py) with random weights, which
give the real cost of every call; the drafters are built at their real sizes (the TokenAdapter of
conf/adapter/token_adapter.yaml, EAGLE-3 at the target's width with its 32,000-token draft vocabulary).
Every decode runs on the fast engine (specdec/engine.py: static KV cache, CUDA graphs on CUDA) and every
speedup is against plain greedy decoding on that same engine.

Acceptance is replayed (specdec/replay.py): each drafter runs its own proposal every round (its cost is
real) but proposes the target's greedy tokens for exactly the traced number of positions, then a wrong one,
so the target accepts exactly the traced lengths; the bench asserts that the output is plain greedy decoding
and that every round accepted what it was given. The trace is `--trace REPORT.json` (`rounds_trace` of a
`specalign evaluate` report, `--trace-drafter` names its drafter) or `--tau T` (drawn with one per-token
acceptance giving tau = T at gamma 5).

The target's weights are random except for a margin: its token embeddings are scaled up so that the
residual stream keeps the current token, and its LM head maps every token to a fixed successor. Greedy
choices then win by a wide margin, so the one-token decode step and the k-token verification (different
kernels, different rounding) choose the same tokens; with plain random weights near-ties flip between them,
which says nothing about speed. Shapes, and therefore costs, are those of the real model.

Printed: the per-call costs (target prefill, decode step, verification of k tokens, each drafter's
proposal, EventGPT's prefill and decode step), then per drafter and gamma the measured tau, ms per token of
plain greedy and of speculation, the decode-phase and end-to-end speedups (prefill included; the
TokenAdapter's setup includes EventGPT generating the response it reads), each beside the speedup projected
by the report's cost model (specdec/online_eval.py) from the measured costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from specalign.adapters.eagle3 import Eagle3Config, Eagle3Drafter, FeatureInputs
from specalign.adapters.registry import DRAFT_RESPONSE
from specalign.adapters.token_adapter import DraftResponse, TokenAdapter, TokenAdapterConfig
from specalign.data.features import feature_name
from specalign.specdec.engine import StaticDecoder
from specalign.specdec.fast_drafters import Eagle3Proposer, TokenAdapterProposer
from specalign.specdec.online import (
    DraftContext,
    crop,
    forward_tokens,
    forward_tree,
    greedy_generate,
    run_prefill,
    speculative_generate,
    tree_generate,
)
from specalign.specdec.online_drafters import OnlineDrafter
from specalign.specdec.online_eval import (
    Entry,
    Prepared,
    entry_numbers,
    model_costs,
    prefill_spec,
    round_verify_s,
    verify_costs,
)
from specalign.specdec.replay import (
    ReplayDrafter,
    ReplayTreeDrafter,
    load_trace,
    replay_lengths,
    replay_tree,
    synthetic_trace,
)
from specalign.specdec.report import TREE_SUFFIX
from specalign.specdec.tree import TreeSpec, tree_spec
from specalign.vlms.base import eagle3_layers
from specalign.vlms.eventgpt_backend import EventGPTBackend
from specalign.vlms.real_configs import random_pair
from specalign.vlms.video_llava_backend import VideoLlavaBackend

from specalign.errors import SpecalignError

QUESTIONS = ["What is happening in this scene?", "Describe the objects and their motion.",
             "What is moving in the background?", "Describe the scene."]
EVENT_FRAMES = 5
GOALS = {"plain_ms": 7.0, "decode": 2.5, "e2e": 2.0}     # on one H200, tau about 4.1 at gamma 5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", choices=("tiny", "real"), default="tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--gammas", type=lambda s: [int(x) for x in s.split(",")], default=[3, 5, 7])
    p.add_argument("--trace", help="report.json of specalign evaluate (its rounds_trace)")
    p.add_argument("--trace-drafter", default="drafter", help="which drafter's rounds of the report to replay")
    p.add_argument("--tau", type=float, default=4.1, help="without --trace: draw a trace with this tau at gamma 5")
    p.add_argument("--tree-budget", type=lambda s: [int(x) for x in s.split(",") if int(x) > 0], default=None,
                   help="draft-tree rows: nodes per tree, a list (default: 16,32 real, 16 tiny; 0: no tree rows)")
    p.add_argument("--tree-topk", type=int, default=TreeSpec().topk, help="children per expanded tree node")
    p.add_argument("--tree-tau", type=float, default=None, help="tree rows without a '<drafter>+tree' trace in "
                   "--trace: draw one with this tau at gamma 5 (default: the chain's tau + 0.6)")
    p.add_argument("--requests", type=int, default=None, help="timed requests per row, one more warms up "
                   "(default: 6 real, 2 tiny)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on with --device cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="fuse elementwise chains with torch.compile (default: on with --device cuda)")
    p.add_argument("--drafters", type=lambda s: s.split(","), default=["token_adapter", "eagle3"])
    p.add_argument("--profile", action="store_true", help="CUDA: the kernels of one eager decode step")
    p.add_argument("--out", help="write every number as JSON here")
    p.add_argument("--threads", type=int, default=1, help="CPU: intra-op threads")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- models

def decisive_weights(model, eos_id: int, special: list[int], seed: int = 0, rms: float = 1000.0) -> None:
    """Scale the token embeddings to RMS `rms` per coordinate and make the LM head map each non-special token
    to a fixed successor (a random permutation): row succ(x) = x's unit embedding. EOS and the other special
    ids get zero rows, so responses never stop early."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    skip = set(special) | {eos_id}
    ids = torch.tensor([i for i in range(min(emb.shape[0], head.shape[0])) if i not in skip])
    succ = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    with torch.no_grad():
        emb.mul_(rms / emb.float().pow(2).mean().sqrt())
        rows = emb[ids.to(emb.device)].float()
        head.zero_()
        head[succ.to(head.device)] = (rows / rows.norm(dim=-1, keepdim=True)).to(head.dtype)


def build(a):
    """Backends (for prompts and inputs) of both models, their fast engines and the drafters."""
    dtype = torch.bfloat16 if a.models == "real" else torch.float32
    target_model, draft_model, tokenizer = random_pair(a.models, a.device, dtype)
    special = [i for i in tokenizer.all_special_ids if i != tokenizer.eos_token_id]
    decisive_weights(target_model, tokenizer.eos_token_id, special)
    target, draft = VideoLlavaBackend(target_model, tokenizer), EventGPTBackend(draft_model, tokenizer)
    widest = max([*a.gammas, *a.tree_budget]) + 1            # a chain's verification or a tree's
    engines = {b.role: StaticDecoder(b.model, a.max_new_tokens + widest, cuda_graphs=a.cuda_graphs, compile=a.compile,
                                     max_width=max(9, widest)) for b in (target, draft)}
    return target, draft, engines, drafters(a, target, dtype)


def drafters(a, target, dtype) -> dict:
    """name -> (drafter on the fast engine, reads EventGPT's response) at the real sizes, random weights."""
    text, device = target.text_config, target.device
    vocab = target.embed_weight().shape[0]
    out = {}
    torch.manual_seed(0)
    if "token_adapter" in a.drafters:       # conf/adapter/token_adapter.yaml; the tiny pair's tests' size for tiny
        size = ({"n_layer": 4, "d_model": 512, "n_head": 8, "d_ff": 2048} if a.models == "real"
                else {"n_layer": 1, "d_model": 32, "n_head": 2, "d_ff": 64})
        ta = TokenAdapter(TokenAdapterConfig(vocab_size=vocab, max_len=1024, dropout=0.0, **size))
        ta = ta.to(device, dtype).eval()
        out["token_adapter"] = (OnlineDrafter(ta, DraftResponse, static=TokenAdapterProposer(
            ta, cuda_graphs=a.cuda_graphs, compile=a.compile)), True)
    if "eagle3" in a.drafters:
        layers = eagle3_layers(text.num_hidden_layers)
        cfg = Eagle3Config(hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
                           num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
                           vocab_size=vocab, draft_vocab_size=min(32000, vocab),
                           feature_names=[feature_name("target", i) for i in layers],
                           fc_in_features=3 * text.hidden_size)
        eagle = Eagle3Drafter(cfg)
        with torch.no_grad():
            eagle.embed_tokens.weight.copy_(target.embed_weight())
        eagle = eagle.to(device, dtype).eval()
        out["eagle3"] = (OnlineDrafter(eagle, lambda: FeatureInputs(cfg.feature_names, None, dtype),
                                       static=Eagle3Proposer(eagle, cuda_graphs=a.cuda_graphs, compile=a.compile)),
                         False)
    return out


def make_requests(a, target: VideoLlavaBackend, draft: EventGPTBackend) -> list[tuple[dict, dict]]:
    """(target prefill, draft prefill) per request: the prompts as the backends build them, random frames."""
    g = torch.Generator().manual_seed(0)
    tv, dv = target.model.config.vision_config.image_size, draft.model.config.vision_config.image_size
    out = []
    for i in range(a.requests + 1):
        q = QUESTIONS[i % len(QUESTIONS)]
        video = torch.randn(1, target.num_frames, 3, tv, tv, generator=g)
        events = torch.randn(1, EVENT_FRAMES, 3, dv, dv, generator=g)
        tb = target.make_batch([None], [target.prompt_ids(q)], {"pixel_values_videos": video})
        db = draft.make_batch([None], [draft.prompt_ids(q, EVENT_FRAMES)], {"event_tensors": events})
        out.append((prefill_spec(tb), prefill_spec(db)))
    return out


# --------------------------------------------------------------------------------------------- measuring

def sync(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def median_seconds(forward, undo, device: str, reps: int = 20) -> float:
    """Median seconds of `forward()` (each followed by `undo()`, untimed), after two warm-up calls."""
    times = []
    for _ in range(reps + 2):
        t0 = sync(device)
        forward()
        times.append(sync(device) - t0)
        undo()
    return statistics.median(times[2:])


def verify_cost(engine: StaticDecoder, spec: dict, widths, device: str, reps: int = 20) -> dict[int, float]:
    """Median seconds of a k-token forward on the prefilled cache (then cropped back), per k."""
    pre = run_prefill(engine, spec)
    tokens = [int(pre.logits.argmax())] * max(widths)
    return {k: median_seconds(lambda k=k: forward_tokens(engine, pre.cache, tokens[:k]),
                              lambda k=k: crop(pre.cache, k), device, reps) for k in widths}


def warm_up(a, engine: StaticDecoder, drafters_, p: Prepared) -> None:
    """Capture (and compile) every graph the timed runs can meet before any timing: the target's forwards of
    1 .. max gamma + 1 tokens with each drafter's hidden layers, each drafter's rounds of 1 .. max gamma."""
    for drafter, reads_response in drafters_.values():
        layers = tuple(drafter.hidden_layers)
        pre = run_prefill(engine, p.target_prefill, layers)
        engine.warm(range(1, max(a.gammas) + 2), layers)
        drafter.begin(DraftContext(p.target_prefill, p.draft.tokens if reads_response else None, pre.length,
                                   pre.hidden))
        for gamma in range(1, max(a.gammas) + 1):
            drafter.propose(p.greedy.tokens[:1], gamma)


def replay_run(a, engine, spec, drafter, reads_response: bool, gamma: int, greedy, draft_tokens, lengths, vocab):
    replay = ReplayDrafter(drafter, greedy, lengths, vocab)
    layers = drafter.hidden_layers
    run = speculative_generate(engine, spec, replay, gamma=gamma, max_new_tokens=a.max_new_tokens,
                               hidden_layers=layers, request=draft_tokens if reads_response else None)
    if run.tokens != greedy:
        raise SystemExit("replayed output differs from plain greedy decoding")
    if [r.accepted for r in run.log] != replay.planned:
        raise SystemExit(f"the target accepted {[r.accepted for r in run.log]}, the trace gave {replay.planned}")
    return run


def measure(a, target, draft, engines, drafters_, trace, source) -> dict:
    requests = make_requests(a, target, draft)
    vocab = target.embed_weight().shape[0]
    # plain greedy decoding of both models on the fast engine (request 0 warms up and captures graphs)
    plain = [greedy_generate(engines["target"], tp, a.max_new_tokens) for tp, _ in requests]
    drafted = [greedy_generate(engines["draft"], dp, a.max_new_tokens) for _, dp in requests]
    prepared = [Prepared(None, tp, dp, g, d) for (tp, dp), g, d in zip(requests, plain, drafted)]
    costs = {"verify_k": verify_cost(engines["target"], requests[0][0], range(1, 9), a.device)}
    greedy_generate(target.model, requests[0][0], 4)      # transformers' growing cache, eager: for scale
    costs["transformers_decode_s"] = model_costs([greedy_generate(target.model, requests[1][0], a.max_new_tokens)])[
        "decode_s"]
    warm_up(a, engines["target"], drafters_, prepared[0])
    rows, runs_by = [], {}
    for name, (drafter, reads_response) in drafters_.items():
        for gamma in a.gammas:
            lengths = replay_lengths(trace, gamma, source)
            runs = [replay_run(a, engines["target"], p.target_prefill, drafter, reads_response, gamma,
                               p.greedy.tokens, p.draft.tokens, lengths, vocab) for p in prepared]
            runs_by[(name, gamma)] = runs[1:]
            print(f"  measured {name} gamma {gamma}", flush=True)
    timed = prepared[1:]
    target_costs = model_costs([p.greedy for p in timed])
    # what a drafter reads decides its setup cost: EventGPT's whole answer is generated before its first round
    entries = {name: Entry(d, DRAFT_RESPONSE if r else None) for name, (d, r) in drafters_.items()}
    for (name, gamma), runs in runs_by.items():
        entries[name].runs[gamma] = runs
    target_costs["verify_s"] = verify_costs(entries, a.gammas)
    for (name, gamma), runs in runs_by.items():
        rows.append(row_numbers(name, gamma, entries[name], runs, timed, target_costs))
    if a.tree_budget:
        costs["tree_verify_w"] = tree_verify_cost(engines["target"], requests[0][0], [1 + b for b in a.tree_budget],
                                                  a.device, vocab)
        rows += measure_trees(a, engines["target"], drafters_, prepared, target_costs, trace)
    costs |= {"target": target_costs, "draft": model_costs([p.draft for p in timed]),
              "prompt": {"target": requests[0][0]["input_ids"].shape[1], "draft": requests[0][1]["input_ids"].shape[1]}}
    return {"costs": costs, "rows": rows, "graphs": graph_status(engines, drafters_)}


def row_numbers(name, gamma, entry, runs, prepared, target_costs) -> dict:
    """The report's numbers (tau, projected speedups) beside the measured ones. A tree row's verification is
    its own (behind the pending token: every round but the first), as in the online report."""
    verify = round_verify_s(entry, runs, target_costs, gamma)
    n = entry_numbers(entry, runs, prepared, target_costs, verify)
    plain_decode = sum(sum(p.greedy.decode_s) for p in prepared) / sum(len(p.greedy.tokens) - 1 for p in prepared)
    spec_decode = sum(r.total_s - r.prefill_s - r.draft_prefill_s for r in runs) / sum(len(r.tokens) for r in runs)
    setups = [r.draft_prefill_s + (p.draft.total_s if entry.reads_draft_response else 0.0)
              for r, p in zip(runs, prepared)]
    plain_total = statistics.mean(p.greedy.total_s for p in prepared)
    spec_total = statistics.mean(r.total_s + s for r, s in zip(runs, setups))
    outside = [r.total_s - r.prefill_s - r.draft_prefill_s - sum(x.draft_s + x.verify_s for x in r.log) for r in runs]
    full = [x.verify_s for r in runs for x in r.log
            if (x.verified > len(x.proposal) if entry.tree else x.verified == gamma + 1)]
    return {"drafter": name, "gamma": gamma, "budget": entry.tree.budget if entry.tree else None, "tau": n["results"]["tau"], "alpha": n["results"]["alpha"],
            "plain_ms_per_token": 1e3 * plain_decode, "spec_ms_per_token": 1e3 * spec_decode,
            "decode_speedup": plain_decode / spec_decode, "decode_projected": n["speedup"]["projected"],
            "e2e_speedup": plain_total / spec_total, "e2e_projected": n["speedup"]["projected_e2e"],
            "plain_ms": 1e3 * plain_total, "spec_ms": 1e3 * spec_total, "setup_ms": 1e3 * statistics.mean(setups),
            "round_ms": 1e3 * n["costs"]["round_s"], "step_ms": 1e3 * (n["costs"]["step_s"] or 0.0),
            "outside_ms_per_round": 1e3 * sum(outside) / sum(len(r.log) for r in runs),
            "verify_ms_own": 1e3 * statistics.mean(full) if full else None,
            "verify_ms_model": 1e3 * verify,
            "rounds": n["results"]["rounds"]}


# --------------------------------------------------------------------------------------------- draft trees

def tree_trace(a, chain_trace, source: str):
    """The acceptance the tree rows replay -> (trace, where it comes from): the '<drafter>+tree' rounds of
    --trace when the report has them, else drawn with --tree-tau (default: the chain's tau at gamma 5 + 0.6, the
    gain trees measured on the real pairs: 4.30 -> 4.97)."""
    name = a.trace_drafter + TREE_SUFFIX
    if a.trace and name in (json.loads(Path(a.trace).read_text()).get("rounds_trace") or {}):
        return load_trace(a.trace, name), f"{a.trace} ({name})"
    tau = a.tree_tau
    if tau is None:
        g = 5 if 5 in chain_trace else min(chain_trace, key=lambda x: abs(x - 5))
        rounds = [x for r in chain_trace[g] for x in r]
        tau = min(1 + statistics.mean(rounds) + 0.6, 6.0)
        return synthetic_trace(tau, a.gammas), (f"drawn with τ = {tau:.2f} at γ = 5 (an assumption: the chain's "
                                                f"τ {tau - 0.6:.2f} from {source} + 0.6)")
    return synthetic_trace(tau, a.gammas), f"drawn with τ = {tau} at γ = 5 (--tree-tau)"


def spine(nodes: int, token: int, vocab: int):
    """A tree of `nodes` nodes for timing a verification of its width (the shape does not change the cost)."""
    return replay_tree(nodes, nodes, [(token + i) % vocab for i in range(nodes)], 0, vocab)


def tree_verify_cost(engine: StaticDecoder, spec: dict, widths, device: str, vocab: int, reps: int = 20
                     ) -> dict[int, float]:
    """Median seconds of a tree verification of W tokens (pending + W - 1 nodes) on the prefilled cache, per W."""
    pre = run_prefill(engine, spec)
    token = int(pre.logits.argmax())
    out = {}
    for w in widths:
        tree = spine(w - 1, token, vocab)
        out[w] = median_seconds(lambda t=tree: forward_tree(engine, engine, [token], t), lambda w=w: crop(engine, w),
                                device, reps)
    return out


def warm_trees(a, engine: StaticDecoder, drafters_, p: Prepared, vocab: int) -> None:
    """Capture the tree graphs the timed runs meet (widths B and 1 + B, each drafter's hidden layers)."""
    for drafter, _ in drafters_.values():
        layers = drafter.hidden_layers
        pre = run_prefill(engine, p.target_prefill, layers)
        token = int(pre.logits.argmax())
        for b in a.tree_budget:
            for pending in ([], [token]):
                forward_tree(engine, engine, pending, spine(b, token, vocab), layers)
                crop(engine, len(pending) + b)


def measure_trees(a, engine: StaticDecoder, drafters_, prepared: list[Prepared], target_costs: dict, chain_trace
                  ) -> list[dict]:
    """Per drafter, gamma and budget: a '<drafter>+tree' row, its drafter growing its real tree every round
    (eagerly: `propose_tree`), the target verifying the replayed tree on the static engine (request 0 warms up)."""
    vocab = engine.model.get_input_embeddings().weight.shape[0]
    trace, a.tree_source = tree_trace(a, chain_trace, a.trace or f"--tau {a.tau}")
    warm_trees(a, engine, drafters_, prepared[0], vocab)
    rows = []
    for name, (drafter, reads_response) in drafters_.items():
        for gamma in a.gammas:
            for budget in a.tree_budget:
                spec = TreeSpec(budget, a.tree_topk)
                entry = Entry(drafter, DRAFT_RESPONSE if reads_response else None, tree=spec)
                lengths = replay_lengths(trace, gamma, a.trace or "--tree-tau")
                runs = [replay_tree_run(a, engine, p, drafter, reads_response, gamma, spec, lengths, vocab)
                        for p in prepared]
                rows.append(row_numbers(f"{name}{TREE_SUFFIX}", gamma, entry, runs[1:], prepared[1:], target_costs))
                print(f"  measured {name}{TREE_SUFFIX} gamma {gamma} budget {budget}", flush=True)
    return rows


def replay_tree_run(a, engine, p: Prepared, drafter, reads_response: bool, gamma: int, spec: TreeSpec, lengths,
                    vocab: int):
    replay = ReplayTreeDrafter(drafter, p.greedy.tokens, lengths, vocab)
    run = tree_generate(engine, p.target_prefill, replay, gamma=gamma, tree=spec, max_new_tokens=a.max_new_tokens,
                        hidden_layers=drafter.hidden_layers, request=p.draft.tokens if reads_response else None)
    if run.tokens != p.greedy.tokens:
        raise SystemExit("replayed tree output differs from plain greedy decoding")
    if [r.accepted for r in run.log] != replay.planned:
        raise SystemExit(f"the target accepted {[r.accepted for r in run.log]} of the trees, the trace gave "
                         f"{replay.planned}")
    return run


def graph_status(engines, drafters_) -> dict:
    def label(k: tuple) -> str:          # (width, layers[, "tree"]): "6", "6+h", "17+tree"
        return str(k[0]) + ("+h" if k[1] else "") + ("+tree" if len(k) > 2 else "")

    def order(keys):
        return sorted(keys, key=lambda k: (len(k), k[0], len(k[1])))

    out = {role: [label(k) for k in order(e.graphs) if e.graphs[k] is not None] for role, e in engines.items()}
    attention = {role: {label(k): e.attention[k] for k in order(e.attention)} for role, e in engines.items()}
    failed = {role: [label(k) for k in order(e.graphs) if e.graphs[k] is None] for role, e in engines.items()}
    for name, (d, _) in drafters_.items():
        out[name] = sorted(str(k) + (" compiled" if k in d.static.compiled else "")
                           for k, g in d.static.graphs.items() if g is not None)
        failed[name] = sorted(str(k) for k, g in d.static.graphs.items() if g is None)
    return {"captured": out, "eager_after_failed_capture": failed, "attention": attention}


def profile_step(engine: StaticDecoder, spec: dict) -> None:
    """The CUDA kernels of one eager 1-token forward (a graph replays the same ones), and the replay's time."""
    from torch.profiler import ProfilerActivity, profile

    pre = run_prefill(engine, spec)
    token = [int(pre.logits.argmax())]
    for _ in range(3):
        ids = torch.tensor(token, device=engine.device)
        engine._step(ids, ())
        engine.cache.crop(-1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine._step(torch.tensor(token, device=engine.device), ())
        torch.cuda.synchronize()
    engine.cache.crop(-1)
    events = prof.key_averages()
    kernels = sum(e.device_time_total for e in events) / 1e3
    print(f"\nOne eager 1-token target forward: {kernels:.3f} ms of CUDA kernels, "
          f"{sum(e.count for e in events)} launches; the heaviest:")
    print(events.table(sort_by="device_time_total", row_limit=12, max_name_column_width=60))


# --------------------------------------------------------------------------------------------- report

def table(head: list[str], lines: list[list[str]]) -> None:
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(line, widths)) + " |")


def row_label(r: dict) -> str:
    return r["drafter"] + (f" B={r['budget']}" if r["budget"] else "")


def agree(measured: float, projected: float | None) -> str:
    if projected is None:
        return "-"
    off = measured / projected - 1
    return f"{100 * off:+.0f} %" + ("" if abs(off) <= 0.10 else " (!)")


def report(a, result: dict, source: str) -> None:
    c, t = result["costs"], result["costs"]["target"]
    print(f"\nmodels {a.models} on {a.device}, CUDA graphs {a.cuda_graphs}, compile {a.compile}; prompts: target {c['prompt']['target']}, "
          f"draft {c['prompt']['draft']} tokens; {a.max_new_tokens} new tokens, {a.requests} timed requests; "
          f"acceptance: {source}")
    lines = [["target prefill", f"{1e3 * t['prefill_s']:.2f}"], ["target decode step", f"{1e3 * t['decode_s']:.3f}"],
             ["target decode step, transformers' growing cache, eager", f"{1e3 * c['transformers_decode_s']:.3f}"]]
    lines += [[f"target verification of {k} tokens", f"{1e3 * s:.3f}"] for k, s in c["verify_k"].items()]
    lines += [[f"target verification of a tree, W = 1 + {w - 1} tokens", f"{1e3 * s:.3f}"]
              for w, s in c.get("tree_verify_w", {}).items()]
    lines += [["EventGPT prefill", f"{1e3 * c['draft']['prefill_s']:.2f}"],
              ["EventGPT decode step", f"{1e3 * c['draft']['decode_s']:.3f}"]]
    for r in result["rows"]:
        what = f"growth of γ={r['gamma']}, B={r['budget']} (per node)" if r["budget"] \
            else f"proposal of γ={r['gamma']} (per token)"
        lines.append([f"{r['drafter']} {what}", f"{r['round_ms']:.3f} ({r['step_ms']:.3f})"])
    print("\nPer-call costs (ms; verification: median of 20, others: means over the timed requests)\n")
    table(["call", "ms"], lines)
    print("\nSpeedup over plain greedy decoding on the same engine (measured, beside the report's projection)\n")
    head = ["drafter", "γ", "τ", "plain ms/token", "spec ms/token", "decode speedup", "projected", "vs proj.",
            "end-to-end speedup", "projected", "vs proj.", "ms/request plain → spec (setup)"]
    lines = [[row_label(r), str(r["gamma"]), f"{r['tau']:.2f}", f"{r['plain_ms_per_token']:.2f}",
              f"{r['spec_ms_per_token']:.2f}", f"{r['decode_speedup']:.2f}x", _x(r["decode_projected"]),
              agree(r["decode_speedup"], r["decode_projected"]), f"{r['e2e_speedup']:.2f}x", _x(r["e2e_projected"]),
              agree(r["e2e_speedup"], r["e2e_projected"]),
              f"{r['plain_ms']:.0f} → {r['spec_ms']:.0f} ({r['setup_ms']:.0f})"] for r in result["rows"]]
    table(head, lines)
    notes(a, result)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def notes(a, result: dict) -> None:
    rows = result["rows"]
    outside = statistics.mean(r["outside_ms_per_round"] for r in rows)
    print(f"\nThe cost model counts per round the drafter's proposal and one verification of γ+1 tokens (a tree: its own "
          "of 1 + n tokens); the engine's "
          f"own work between them (acceptance, cropping, handing features on, timing) measured {outside:.3f} ms per "
          "round on average, and the first round verifies γ tokens (no pending bonus token yet).")
    for r in rows:
        if r["decode_projected"] and abs(r["decode_speedup"] / r["decode_projected"] - 1) > 0.10:
            print(f"{r['drafter']} γ={r['gamma']}: measured and projected differ by more than 10 %: its own full "
                  f"verifications took {_ms(r['verify_ms_own'])} ms against the {_ms(r['verify_ms_model'])} ms the "
                  f"model pools over all drafters, drafting {r['round_ms']:.3f} ms per round, the engine's work "
                  f"{r['outside_ms_per_round']:.3f} ms per round.")
    if any(r["drafter"] == "token_adapter" for r in rows):
        print("The TokenAdapter reads EventGPT's whole free-running response: its setup (end to end) is EventGPT's "
              "prefill and decoding, run before the target.")
    for w, sec in result["costs"].get("tree_verify_w", {}).items():
        chains = ", ".join(f"γ={g}: {1e3 * result['costs']['verify_k'][g + 1]:.3f} ms" for g in a.gammas
                           if g + 1 in result["costs"]["verify_k"])
        print(f"Verifying a tree of {w - 1} nodes (W = {w} tokens) costs {1e3 * sec:.3f} ms, a chain's γ + 1 tokens "
              f"{chains}.")
    if any(r["budget"] for r in rows):
        print(f"'<drafter>{TREE_SUFFIX} B=n': the drafter grows its EAGLE-2 tree of n nodes (top-{a.tree_topk}, depth γ) "
              "every round, eagerly (its `tree_logprobs`, no CUDA graph), and the target verifies 1 + n tokens in one "
              f"forward on the static engine ({'a CUDA graph per width' if a.cuda_graphs else 'graphs off'}). "
              "Acceptance: "
              f"{a.tree_source}. The verified tree keeps the grown tree's node count (its width, the verification's "
              "cost) laid out as a spine of depth γ holding the traced accepted tokens, the other nodes rejected "
              "siblings (random weights grow flat trees; the cost does not depend on the shape).")
    if any(r["drafter"] == "eagle3" for r in rows):
        print("EAGLE-3 proposes nothing before the first accepted token; replayed, its first round still proposes "
              "the traced tokens (at no drafting cost).")
    g = result["graphs"]
    if any(g["attention"].values()):
        print(f"Attention kernel kept per graph width (+h: with hidden states): {g['attention']}")
    if any(g["eager_after_failed_capture"].values()):
        print(f"CUDA graphs that fell back to eager: {g['eager_after_failed_capture']}")
    if a.device == "cuda" and a.models == "real":
        plain = result["costs"]["target"]["decode_s"] * 1e3
        best = max((r for r in rows if r["gamma"] == 5), key=lambda r: r["e2e_speedup"], default=None)
        print(f"\nGoals: plain greedy {plain:.2f} ms/token (goal <= {GOALS['plain_ms']}); best drafter at γ=5: "
              + ("-" if best is None else f"{row_label(best)}, decode {best['decode_speedup']:.2f}x (goal >= "
                 f"{GOALS['decode']}x), end to end {best['e2e_speedup']:.2f}x (goal >= {GOALS['e2e']}x)"))


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    if a.cuda_graphs is None:
        a.cuda_graphs = a.device == "cuda"
    if a.compile is None:
        a.compile = a.device == "cuda"
    if a.requests is None:
        a.requests = 6 if a.models == "real" else 2
    if a.tree_budget is None:
        a.tree_budget = [16, 32] if a.models == "real" else [16]
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    try:
        if a.trace:
            trace, source = load_trace(a.trace, a.trace_drafter), f"{a.trace} ({a.trace_drafter})"
        else:
            trace, source = synthetic_trace(a.tau, a.gammas), f"drawn with τ = {a.tau} at γ = 5"
        for b in a.tree_budget:                 # the tree configurations that cannot work
            tree_spec({"budget": b, "topk": a.tree_topk}, a.gammas)
        with torch.inference_mode():
            target, draft, engines, drafters_ = build(a)
            result = measure(a, target, draft, engines, drafters_, trace, a.trace or "--tau")
    except SpecalignError as e:
        sys.exit(f"error: {e}")
    report(a, result, source)
    if a.profile and a.device == "cuda":
        with torch.inference_mode():
            profile_step(engines["target"], make_requests(a, target, draft)[0][0])
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), **result}, indent=1, default=str))


if __name__ == "__main__":
    main()
