"""Online speculative decoding over a Hugging Face causal LM target.

One sequence at a time (batch size 1). A round at accepted length p:
  1. the drafter proposes up to gamma tokens from the accepted prefix;
  2. the target verifies them in ONE forward over (pending bonus token + proposals), which gives
     its distribution at every proposed position and at the position after them;
  3. greedy: keep the longest prefix equal to the target argmax, then the target's own token;
     sampling: speculative sampling (accept x with prob min(1, p(x)/q(x)); on the first rejection
     draw from max(0, p - q) renormalised; if all are accepted draw the bonus from p), which leaves
     the target's output distribution unchanged;
  4. the target's KV cache is cropped back to the accepted tokens.

The bonus token is "pending": it enters the target cache at the head of the next verification.
Rounds are logged raw (start, proposal, accepted) and turned into `metrics.Round` records with
`make_round` against the final output, so online and offline numbers share one definition.

Prefill: a dict of the target's input kwargs (input_ids, attention_mask, pixel values, ...), run in
one forward with a fresh DynamicCache, or a zero-argument callable returning
(logits_last, cache, prompt_len[, hidden]) with a fresh cache on every call. Decode steps feed
`input_ids`, so the target must accept them after the prefill (positions come from the cache length).

Engines: a model is decoded with transformers' growing cache (`DynamicCache`, above); a
`specdec.engine.StaticDecoder` in its place (target, draft model, or the EventGPT of an EAGLE-3 drafter)
decodes on its preallocated static cache, with CUDA graphs when asked. `run_prefill`, `forward_tokens`,
`crop`, and for draft trees `forward_tree` and `compact`, take either, so every function below runs on both
(`make_engine` builds one from `engine.*` keys).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from specalign.specdec.engine import StaticDecoder
from specalign.specdec.metrics import Acceptance, Round, accept_length, make_round, round_at
from specalign.specdec.tree import Tree, TreeSpec, round_counts, verify_inputs
from torch import Tensor
from transformers import DynamicCache

from specalign.errors import SpecalignError

PrefillSpec = Mapping[str, Any] | Callable[[], tuple]


# ----------------------------------------------------------------------------- target calls

class Prefill(NamedTuple):
    logits: Tensor                          # [V] next-token logits after the prompt
    cache: DynamicCache | StaticDecoder     # holds the prompt
    length: int                             # prompt length in the cache
    hidden: dict[int, Tensor] | None = None  # layer -> [length, H]


def _cache_kwarg(model) -> str:
    """The forward's cache argument: `cache` in recent transformers 5.x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _pick_hidden(out, layers: Sequence[int]) -> dict[int, Tensor] | None:
    """Indices into the model's `hidden_states` tuple (0 = embeddings); batch dim dropped: [L, H]."""
    return {i: out.hidden_states[i][0] for i in layers} if layers else None


ENGINES = ("static", "dynamic")


def make_engine(model, kind: str = "dynamic", reserve: int = 64, max_len: int | None = None,
                cuda_graphs: bool | None = None, compile: bool | None = None, max_width: int = 9):
    """The model as the online functions decode it: itself (kind "dynamic": transformers' growing cache) or a
    `StaticDecoder` (kind "static"; `cuda_graphs` and `compile` None: on when the model is on CUDA; forwards up to
    `max_width` tokens replayed as graphs: gamma + 1 for chains, 1 + tree.budget for trees)."""
    if kind not in ENGINES:
        raise SpecalignError(f"engine.kind must be one of {ENGINES}, got {kind!r}")
    if kind == "dynamic":
        if cuda_graphs or compile:
            raise SpecalignError("engine.cuda_graphs / engine.compile need engine.kind=static (a growing cache "
                                 "changes shape at every step)")
        return model
    on_cuda = model.get_input_embeddings().weight.device.type == "cuda"
    return StaticDecoder(model, reserve, max_len, on_cuda if cuda_graphs is None else cuda_graphs,
                         max_width=max_width, compile=on_cuda if compile is None else compile)


@torch.no_grad()
def run_prefill(model, spec: PrefillSpec, hidden_layers: Sequence[int] = ()) -> Prefill:
    if isinstance(model, StaticDecoder):
        logits, length, hidden = model.prefill(spec, hidden_layers)
        return Prefill(logits, model, length, hidden)
    if callable(spec):
        logits, cache, length, *hidden = spec()
        return Prefill(logits.reshape(-1, logits.shape[-1])[-1].float(), cache, int(length),
                       hidden[0] if hidden else None)
    cache = DynamicCache()
    out = model(**spec, use_cache=True, output_hidden_states=bool(hidden_layers), **{_cache_kwarg(model): cache})
    return Prefill(out.logits[0, -1].float(), cache, cache.get_seq_length(), _pick_hidden(out, hidden_layers))


@torch.no_grad()
def forward_tokens(model, cache: DynamicCache | StaticDecoder, tokens: Sequence[int],
                   hidden_layers: Sequence[int] = ()) -> tuple[Tensor, dict[int, Tensor] | None]:
    """Run `tokens` after the cached prefix (the cache grows by len(tokens)).
    Returns logits [L, V] (float32) and hidden states {layer: [L, H]}."""
    if isinstance(cache, StaticDecoder):
        return cache.forward(tokens, hidden_layers)
    device = model.device
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)                 # [1, L]
    mask = torch.ones(1, cache.get_seq_length() + ids.shape[1], dtype=torch.long, device=device)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True,
                output_hidden_states=bool(hidden_layers), **{_cache_kwarg(model): cache})
    return out.logits[0].float(), _pick_hidden(out, hidden_layers)


def crop(cache: DynamicCache | StaticDecoder, n: int) -> None:
    """Drop the last n cached positions (crop(0) is never called: older 5.x read it as 'keep 0')."""
    if isinstance(cache, StaticDecoder):
        cache.crop(n)
    elif n > 0:
        cache.crop(-n)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ----------------------------------------------------------------------------- sampling rule

@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0

    def probs(self, logits: Tensor) -> Tensor:
        """[..., V] logits -> [..., V] probabilities after temperature and nucleus filtering."""
        p = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p >= 1.0:
            return p
        sorted_p, order = p.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < self.top_p           # the top token is always kept
        p = torch.zeros_like(p).scatter(-1, order, sorted_p * keep)
        return p / p.sum(-1, keepdim=True)


def draw(p: Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(p, 1, generator=generator))


def residual(p: Tensor, q: Tensor) -> Tensor:
    """Distribution of the replacement for a rejected draft token: max(0, p - q) renormalised. [V]"""
    r = (p - q).clamp_min(0)
    total = r.sum()
    return r / total if total > 0 else p   # p == q up to rounding: any draw from p is exact


def greedy_accept(logits: Tensor, proposal: list[int]) -> tuple[int, int]:
    """logits [k+1, V]. -> (accepted a, the target's token at position a)."""
    best = logits.argmax(-1).tolist()
    a = accept_length(proposal, best, 0)
    return a, best[a]


def speculative_accept(p: Tensor, q: Tensor, proposal: list[int],
                       generator: torch.Generator | None) -> tuple[int, int]:
    """p [k+1, V] target, q [k, V] draft (CPU). -> (accepted a, the token drawn at position a)."""
    u = torch.rand(len(proposal), generator=generator)
    for i, x in enumerate(proposal):
        if u[i] * q[i, x] >= p[i, x]:                                   # reject: u >= p(x) / q(x)
            return i, draw(residual(p[i], q[i]), generator)
    return len(proposal), draw(p[len(proposal)], generator)


# ----------------------------------------------------------------------------- drafters

@dataclass
class DraftContext:
    prefill: PrefillSpec                    # the target's prompt
    request: Any                            # per-sequence data for the drafter (its prompt, its token list)
    prompt_len: int                         # target prompt length
    hidden: dict[int, Tensor] | None        # target prompt hidden states {layer: [prompt_len, H]}


class Drafter(Protocol):
    def begin(self, context: DraftContext) -> None:
        """Once per sequence, after the target prefill."""

    def propose(self, accepted: list[int], gamma: int) -> tuple[list[int], Tensor | None]:
        """Up to gamma tokens following `accepted` (the response so far), and q [gamma, V], the
        distributions they were drawn from; None for deterministic proposals (q is one-hot)."""

    def observe(self, accepted_tokens: list[int], hidden: dict[int, Tensor] | None) -> None:
        """After each round: the tokens it appended, and the target's hidden states {layer: [m, H]} of
        the m tokens that entered the target cache this round (the previous bonus token, none in round
        0, then the accepted drafts). With the prompt's from `begin`, the drafter then holds target
        features for every token of the sequence but the newest one, the bonus, whose features come
        with the next round. `hidden` is None without hidden_layers, or when a round ran no target forward."""

    def sampled(self, sampling: Sampling, generator: torch.Generator | None) -> Drafter:
        """The same drafter (shared weights) drawing its proposals for speculative sampling and returning q."""


class TokenListDrafter:
    """Proposes request[p:p+gamma] at accepted length p: a fixed draft response (the raw-draft baseline)."""

    def begin(self, context: DraftContext) -> None:
        self.tokens = [int(t) for t in context.request]

    def propose(self, accepted: list[int], gamma: int) -> tuple[list[int], None]:
        return self.tokens[len(accepted): len(accepted) + gamma], None

    def observe(self, accepted_tokens: list[int], hidden: dict[int, Tensor] | None) -> None:
        pass

    def sampled(self, sampling: Sampling, generator: torch.Generator | None) -> TokenListDrafter:
        return TokenListDrafter()                               # fixed tokens: q is one-hot


class ModelDrafter:
    """An ordinary draft model with its own KV cache, rolled back to the accepted prefix each round.
    `request` is its prefill (a PrefillSpec). Greedy unless `sampling` is given."""

    def __init__(self, model, sampling: Sampling | None = None, generator: torch.Generator | None = None):
        self.model, self.sampling, self.generator = model, sampling, generator

    def begin(self, context: DraftContext) -> None:
        self._start(context.request)

    def _start(self, spec: PrefillSpec) -> None:
        pre = run_prefill(self.model, spec)
        self.cache, self.prompt_logits, self.prompt_len = pre.cache, pre.logits, pre.length
        self.seen: list[int] = []    # response tokens in the draft cache after the prompt

    def _feed(self, tokens: list[int]) -> Tensor:
        self.seen += tokens
        return forward_tokens(self.model, self.cache, tokens)[0][-1]

    def _sync(self, accepted: list[int]) -> Tensor:
        """Bring the cache to prompt + accepted; -> logits [V] for the next position."""
        if not accepted:
            crop(self.cache, len(self.seen))
            self.seen = []
            return self.prompt_logits
        keep = min(accept_length(self.seen, accepted, 0), len(accepted) - 1)   # re-feed >= 1 token for logits
        crop(self.cache, len(self.seen) - keep)
        self.seen = self.seen[:keep]
        return self._feed(accepted[keep:])

    def propose(self, accepted: list[int], gamma: int) -> tuple[list[int], Tensor | None]:
        logits, tokens, qs = self._sync(accepted), [], []
        for i in range(gamma):
            if self.sampling is None:
                tokens.append(int(logits.argmax()))
            else:
                qs.append(self.sampling.probs(logits))
                tokens.append(draw(qs[-1].cpu(), self.generator))
            if i + 1 < gamma:
                logits = self._feed(tokens[-1:])
        return tokens, torch.stack(qs) if qs else None

    def observe(self, accepted_tokens: list[int], hidden: dict[int, Tensor] | None) -> None:
        pass

    def sampled(self, sampling: Sampling, generator: torch.Generator | None) -> ModelDrafter:
        return type(self)(self.model, sampling, generator)


# ----------------------------------------------------------------------------- the engine

@dataclass
class RoundLog:
    start: int              # accepted length at the start of the round
    proposal: list[int]     # draft tokens sent to verification (<= gamma)
    accepted: int           # draft tokens the target kept (before EOS / length truncation)
    verified: int           # tokens in the verification forward: pending bonus + proposal
    draft_s: float          # drafter.propose
    verify_s: float         # the target's verification forward


@dataclass
class OnlineResult:
    tokens: list[int]
    log: list[RoundLog]
    rounds: list[Round]     # make_round over the final output: the shared metric definition
    gamma: int
    prefill_s: float        # target prefill
    draft_prefill_s: float  # drafter.begin
    total_s: float

    def acceptance(self) -> Acceptance:
        acc = Acceptance(self.gamma)
        acc.add_sample(self.rounds)
        return acc

    def costs(self) -> dict:
        """Mean per-call seconds; verify counts only full gamma+1 verifications (None if there were none)."""
        full = [r.verify_s for r in self.log if r.verified == self.gamma + 1]
        return {"prefill_s": self.prefill_s, "draft_prefill_s": self.draft_prefill_s,
                "draft_s": sum(r.draft_s for r in self.log) / max(len(self.log), 1),
                "verify_s": sum(full) / len(full) if full else None,
                "total_s": self.total_s, "tokens_per_s": len(self.tokens) / self.total_s}


@dataclass
class GreedyResult:
    tokens: list[int]
    prefill_s: float
    decode_s: list[float]   # one-token decode steps
    total_s: float


def _eos_set(eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    return frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)


def _finished(out: list[int], eos: frozenset[int], max_new_tokens: int) -> bool:
    return len(out) >= max_new_tokens or bool(out and out[-1] in eos)


def _truncate(new: list[int], eos: frozenset[int], budget: int) -> list[int]:
    """Cut after the first EOS and at the length budget."""
    for i, t in enumerate(new):
        if t in eos:
            new = new[: i + 1]
            break
    return new[:budget]


@torch.no_grad()
def greedy_generate(target, prefill: PrefillSpec, max_new_tokens: int,
                    eos_token_id: int | Sequence[int] | None = None) -> GreedyResult:
    """Plain greedy decoding, one token per target forward, with a KV cache."""
    device, eos = target.device, _eos_set(eos_token_id)
    t0 = _now(device)
    pre = run_prefill(target, prefill)
    prefill_s = _now(device) - t0
    out, decode_s, logits = [], [], pre.logits
    while not _finished(out, eos, max_new_tokens):
        if out:
            t = _now(device)
            logits = forward_tokens(target, pre.cache, out[-1:])[0][-1]
            decode_s.append(_now(device) - t)
        out.append(int(logits.argmax()))
    return GreedyResult(out, prefill_s, decode_s, _now(device) - t0)


def _begin(target, prefill: PrefillSpec, drafter, hidden_layers: Sequence[int], request: Any):
    """The target's prefill, then the drafter's `begin` on it -> (prefill, (start, prefill done, begin done))."""
    device = target.device
    t0 = _now(device)
    pre = run_prefill(target, prefill, hidden_layers)
    t1 = _now(device)
    drafter.begin(DraftContext(prefill, request, pre.length, pre.hidden))
    return pre, (t0, t1, _now(device))


@torch.no_grad()
def speculative_generate(target, prefill: PrefillSpec, drafter: Drafter, *, gamma: int, max_new_tokens: int,
                         eos_token_id: int | Sequence[int] | None = None, sampling: Sampling | None = None,
                         generator: torch.Generator | None = None, hidden_layers: Sequence[int] = (),
                         request: Any = None) -> OnlineResult:
    """Speculative decoding of one sequence: greedy when `sampling` is None, else speculative sampling
    (`generator`: a CPU generator for the acceptance draws). `hidden_layers` selects the target hidden
    states handed to `drafter.begin` / `drafter.observe`; `request` goes to the drafter's context."""
    device, eos = target.device, _eos_set(eos_token_id)
    pre, (t0, t1, t2) = _begin(target, prefill, drafter, hidden_layers, request)

    out, log = [], []
    pending: list[int] = []        # accepted but not yet in the target cache: the last bonus token
    while not _finished(out, eos, max_new_tokens):
        budget = max_new_tokens - len(out)
        ta = _now(device)
        proposal, q = drafter.propose(list(out), min(gamma, budget))
        proposal = [int(x) for x in proposal[: min(gamma, budget)]]
        tb = _now(device)
        logits, hidden = _verify(target, pre, pending, proposal, hidden_layers)   # [k+1, V]
        tc = _now(device)
        a, bonus = _accept(logits, proposal, q, sampling, generator)
        crop(pre.cache, len(proposal) - a)       # keep pending + the accepted drafts
        drafter.observe(proposal[:a] + [bonus],
                        {i: h[: len(pending) + a] for i, h in hidden.items()} if hidden else None)
        log.append(RoundLog(len(out), proposal, a, len(pending) + len(proposal), tb - ta, tc - tb))
        out += _truncate(proposal[:a] + [bonus], eos, budget)
        pending = [bonus]
    rounds = [make_round(r.proposal, out, r.start, gamma) for r in log]
    return OnlineResult(out, log, rounds, gamma, t1 - t0, t2 - t1, _now(device) - t0)


def _verify(target, pre: Prefill, pending: list[int], proposal: list[int],
            hidden_layers: Sequence[int]) -> tuple[Tensor, dict[int, Tensor] | None]:
    """Target logits at each proposed position and the one after: [len(proposal) + 1, V].
    Round 0 has no pending token: its first row is the prefill's last logits."""
    tokens = pending + proposal
    if not tokens:
        return pre.logits[None], None
    logits, hidden = forward_tokens(target, pre.cache, tokens, hidden_layers)
    if not pending:
        logits = torch.cat([pre.logits[None], logits])
    return logits, hidden


def _accept(logits: Tensor, proposal: list[int], q: Tensor | None, sampling: Sampling | None,
            generator: torch.Generator | None) -> tuple[int, int]:
    if sampling is None:
        return greedy_accept(logits, proposal)
    p = sampling.probs(logits).cpu()                                                  # [k+1, V]
    vocab = p.shape[-1]
    if q is None:                                                   # deterministic proposals
        q = F.one_hot(torch.tensor(proposal, dtype=torch.long), vocab).float()
    q = F.pad(q[: len(proposal)].float().cpu(), (0, vocab - q.shape[-1]))   # [k, V]; a smaller draft vocab
    return speculative_accept(p, q, proposal, generator)


# ----------------------------------------------------------------------------- draft trees (specdec/tree.py)

@torch.no_grad()
def forward_tree(model, cache: DynamicCache | StaticDecoder, pending: Sequence[int], tree: Tree,
                 hidden_layers: Sequence[int] = ()) -> tuple[Tensor, dict[int, Tensor] | None]:
    """One target forward over [pending] + the tree's nodes after the cached prefix, each node at its own depth's
    position and seeing only its ancestors (a 4D mask, which transformers' LLaMA takes as it is; the static engine
    builds it from its own length, `StaticDecoder.forward_tree`).
    The cache grows by len(pending) + len(tree). -> logits [M, V] (float32), hidden states {layer: [M, H]}."""
    if isinstance(cache, StaticDecoder):
        return cache.forward_tree(pending, tree, hidden_layers)
    ids, positions, mask = verify_inputs(tree, pending, cache.get_seq_length(), model.dtype, model.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                output_hidden_states=bool(hidden_layers), **{_cache_kwarg(model): cache})
    return out.logits[0].float(), _pick_hidden(out, hidden_layers)


def cached_length(cache: DynamicCache | StaticDecoder) -> int:
    return cache.length if isinstance(cache, StaticDecoder) else cache.get_seq_length()


def compact(cache: DynamicCache | StaticDecoder, keep: Sequence[int]) -> None:
    """Keep only the cached positions `keep`, in order (after a tree verification: the prefix, the pending token
    and the accepted path), so the cache is the one decoding that path would have left."""
    if isinstance(cache, StaticDecoder):
        cache.compact(keep)
        return
    index = None
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or not layer.keys.numel():
            continue
        index = torch.as_tensor(list(keep), dtype=torch.long, device=layer.keys.device) if index is None else index
        layer.keys, layer.values = layer.keys.index_select(-2, index), layer.values.index_select(-2, index)


@torch.no_grad()
def tree_generate(target, prefill: PrefillSpec, drafter, *, gamma: int, tree: TreeSpec, max_new_tokens: int,
                  eos_token_id: int | Sequence[int] | None = None, hidden_layers: Sequence[int] = (),
                  request: Any = None) -> OnlineResult:
    """Greedy speculative decoding of one sequence with draft trees of depth gamma: the drafter grows a tree from
    the accepted prefix (`drafter.propose_tree`), the target verifies it in one forward (`forward_tree`), the
    longest root path equal to its greedy tokens is accepted with the target's own token after it, and the cache
    is compacted to that path (on either engine). Rounds are scored from the trees against the final output (`tree.round_counts`),
    the definition the offline simulation uses."""
    device, eos = target.device, _eos_set(eos_token_id)
    pre, (t0, t1, t2) = _begin(target, prefill, drafter, hidden_layers, request)
    out, log, trees, pending = [], [], [], []
    while not _finished(out, eos, max_new_tokens):
        budget = max_new_tokens - len(out)
        ta = _now(device)
        draft = drafter.propose_tree(list(out), gamma, tree)
        tb = _now(device)
        cached = cached_length(pre.cache)
        logits, hidden = forward_tree(target, pre.cache, pending, draft, hidden_layers) if pending or len(draft) \
            else (pre.logits[None], None)
        if not pending and len(draft):
            logits = torch.cat([pre.logits[None], logits])              # row 0: after the prefix, 1 + i: node i
        best = logits.argmax(-1).tolist()
        path = draft.accepted(lambda i, best=best: best[i + 1])
        bonus = best[path[-1] + 1 if path else 0]
        rows = list(range(len(pending))) + [len(pending) + i for i in path]        # what stays in the cache
        compact(pre.cache, list(range(cached)) + [cached + j for j in rows])
        tc = _now(device)
        accepted = [draft.tokens[i] for i in path]
        drafter.observe(accepted + [bonus], {i: h[rows] for i, h in hidden.items()} if hidden else None)
        log.append(RoundLog(len(out), list(draft.tokens), len(path), len(pending) + len(draft), tb - ta, tc - tb))
        trees.append(draft)
        out += _truncate(accepted + [bonus], eos, budget)
        pending = [bonus]
    rounds = [round_at(r.start, *round_counts(t, out, r.start), len(out)) for r, t in zip(log, trees)]
    return OnlineResult(out, log, rounds, gamma, t1 - t0, t2 - t1, _now(device) - t0)
