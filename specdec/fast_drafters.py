"""The drafters' greedy proposals on static shapes, one CUDA graph per round (specdec/engine.py).

A round's proposal is gamma dependent drafter steps; run eagerly from Python, each step launches about a
hundred small kernels and waits for its argmax, which costs more than the drafter's arithmetic. Here the
whole proposal (the pass over the accepted prefix, then gamma - 1 one-token steps feeding back their own
argmax on the device) is one function of fixed-size buffers: the accepted prefix is padded to a bucket
(a power of two, at least 64) and masked, so one graph serves every round of every request up to that
length. The computation is the drafters' own (`TokenAdapter._decode` / `_logprobs`, `Eagle3Drafter.step`),
with masks instead of slicing; on the CPU (graphs off) the same functions run eagerly and propose what the
eager `propose` methods do (tests/test_engine.py).

A drafter type offers its proposer through `DrafterType.static_proposer` (adapters/registry.py); the online
drafter (specdec/online_drafters.py) calls `begin(context)` once per sequence and `propose(context, prefix,
gamma)` each greedy round, with the context its inputs give (`OnlineInputs.context`).
TokenAdapter: the draft segment depends only on EventGPT's response, so it is encoded once per request
(`begin`) into fixed buffers instead of once per round.
EAGLE-3: step 0 re-runs over all accepted feature rows each round, as `Eagle3Drafter.propose` does (with the
prompt context, after the prompt row; the video rows' keys are computed once per request, in `begin`).
Sampling mode (speculative sampling) keeps the eager path: `sampled` gives the eager drafter.
With `compile` (CUDA) a round is fused by torch.compile before its capture (5 to 20 s of compilation per
gamma; about 2x faster rounds: the drafters are small, so their kernels are short and many).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from specalign.specdec.engine import Graph, capture, check_graphs_device
from torch import Tensor

# Rounds shorter than this (the last round of an answer, cut by its length) keep the plain graph: compiling
# one costs seconds and saves little. Compilation is static (dynamic=False): with dynamic shapes the fused
# rounds ran far slower on an H200.
MIN_COMPILED_GAMMA = 3


def bucket(n: int, smallest: int = 64) -> int:
    """Static sizes grow in powers of two: few graphs for any length."""
    size = smallest
    while size < n:
        size *= 2
    return size


class _Proposer:
    """Runs `self._round(key, gamma)` (a function of fixed buffers -> token ids [gamma]) eagerly or as a graph
    captured on its first use."""

    def __init__(self, device: torch.device, cuda_graphs: bool, compile: bool = False):
        check_graphs_device(cuda_graphs, device, "cuda_graphs")
        check_graphs_device(compile, device, "compile")
        self.device, self.cuda_graphs, self.compile = device, cuda_graphs, compile
        self.p = torch.zeros(1, dtype=torch.long, device=device)    # accepted prefix length, read on the device
        self.graphs: dict[tuple, Graph | None] = {}
        self.compiled: set[tuple] = set()                           # the graphs captured from compiled rounds

    def begin(self, context) -> None:
        """Once per sequence, with the drafter's context at the empty prefix."""

    def _round(self, key: tuple, gamma: int) -> Callable[[], Tensor]:
        raise NotImplementedError

    def _run(self, key: tuple, gamma: int) -> list[int]:
        fn = self._round(key, gamma)
        if self.cuda_graphs:
            k = (*key, gamma)
            if k not in self.graphs:               # fused by torch.compile when asked, else (or failing) as it is
                name = f"a {gamma}-token drafter proposal {key}"
                fused = None
                if self.compile and gamma >= MIN_COMPILED_GAMMA:
                    fused = capture(torch.compile(fn, dynamic=False), name + " (compiled)", warn=False)
                    if fused is not None:
                        self.compiled.add(k)
                self.graphs[k] = fused or capture(fn, name)
            if self.graphs[k] is not None:
                return self.graphs[k]().tolist()
        return fn().tolist()


class TokenAdapterProposer(_Proposer):
    """Greedy `TokenAdapter.propose` on buffers: the encoded draft segment (bucket M) and [SEP, prefix] (bucket P)."""

    def __init__(self, model, cuda_graphs: bool = False, compile: bool = False):
        super().__init__(model.head.weight.device, cuda_graphs, compile)
        self.model = model
        self.memory: dict[int, tuple] = {}       # M -> (DraftMemory, has [1]) or (None, None): fixed tensors
        self.prefix: dict[int, Tensor] = {}      # P -> [1, P] ids: SEP, r_0 .. r_{p-1}, stale padding

    @torch.inference_mode()
    def set_draft(self, draft: Sequence[int]) -> None:
        """Encode the draft segment once for the request (right padded to its bucket, masked)."""
        c = self.model.config
        draft = [int(t) for t in draft][: c.max_len]
        self.m = min(bucket(max(len(draft), 1)), c.max_len)
        ids = torch.zeros(1, self.m, dtype=torch.long, device=self.device)
        ids[0, : len(draft)] = torch.tensor(draft, dtype=torch.long)
        fresh = self.model._memory(ids, torch.tensor([len(draft)], device=self.device), None)
        if self.m not in self.memory:
            self.memory[self.m] = fresh
        else:                                   # graphs read these tensors: write in place
            for dst, src in zip(_memory_tensors(*self.memory[self.m]), _memory_tensors(*fresh)):
                dst.copy_(src)
        self.draft = draft

    def begin(self, draft: Sequence[int] | None) -> None:
        self.set_draft(draft or [])

    @torch.inference_mode()
    def propose(self, draft: Sequence[int] | None, prefix: Sequence[int], gamma: int) -> list[int]:
        """The request's draft was encoded by `begin`; a streaming draft that grew since is encoded again."""
        c, p = self.model.config, len(prefix)
        if [int(t) for t in (draft or [])][: c.max_len] != self.draft:
            self.set_draft(draft or [])
        gamma = min(gamma, c.max_len - p)
        if gamma <= 0:
            return []
        size = bucket(p + 1)
        if size > c.max_len + 1:                # past the learned positions' bucket: the eager path
            return self.model.propose(self.draft, list(prefix), gamma)[0]
        if size not in self.prefix:
            self.prefix[size] = torch.full((1, size), c.sep_id, dtype=torch.long, device=self.device)
        if p:
            self.prefix[size][0, 1: p + 1].copy_(torch.tensor(list(prefix), dtype=torch.long))
        self.p.fill_(p)
        return self._run((self.m, size), gamma)

    def _round(self, key: tuple, gamma: int) -> Callable[[], Tensor]:
        model, (m, size) = self.model, key
        memory, has = self.memory[m]
        ids, p = self.prefix[size], self.p

        def run() -> Tensor:
            h, kv = model._decode(ids, 0, memory, has)                           # [1, P, d], causal
            keys = torch.arange(size, device=ids.device) <= p                     # prefix keys of later steps
            tok = model._logprobs(h.index_select(1, p), memory, has).argmax(-1)   # [1, 1]: r_p
            out = [tok]
            for j in range(1, gamma):                                             # r_{p+j-1} at position p + j
                keys = torch.cat([keys, keys.new_ones(1)])
                h, kv = model._decode(tok, p + j, memory, has, kv, keys[None])
                tok = model._logprobs(h, memory, has).argmax(-1)
                out.append(tok)
            return torch.cat(out, 1)[0]                                           # [gamma]
        return run


def _memory_tensors(memory, has) -> list[Tensor]:
    if memory is None:
        return []
    return [t for kv in memory.kv for t in kv] + [memory.hidden, memory.mask, memory.tokens, has]


class Eagle3Proposer(_Proposer):
    """Greedy `Eagle3Drafter.propose` on buffers: the fused feature rows and tokens of the accepted prefix (bucket P).
    With the prompt context (a `PromptRows` context) the prompt row and last prompt token come first and the video
    rows' keys/values, computed once per request (`begin`), sit in fixed buffers every query attends to."""

    def __init__(self, model, cuda_graphs: bool = False, compile: bool = False):
        super().__init__(model.fc.weight.device, cuda_graphs, compile)
        self.model = model
        self.rows: dict[int, tuple[Tensor, Tensor]] = {}   # P -> (features [1, P, fc_in], ids [1, P])
        self.memory: list[Tensor] = []                     # the video rows' (k, v) [1, n_kv, K, hd], per request

    @torch.inference_mode()
    def begin(self, context) -> None:
        if self.model.config.prompt_context:
            video = self.model.prompt_rows(context)["video"].to(self.device)
            kv = self.model.memory(video)
            if not self.memory:
                self.memory = [torch.empty_like(t) for t in kv]
            for buf, t in zip(self.memory, kv):
                buf.copy_(t)

    @torch.inference_mode()
    def propose(self, features, tokens: Sequence[int], gamma: int) -> list[int]:
        context = self.model.prompt_rows(features)
        if context is not None:                            # the sequence starts with the prompt row and its token
            rows = torch.cat([context["prompt"].to(features.rows.dtype), features.rows[: len(tokens)]])
            tokens = [int(context["prompt_token"][0]), *tokens]
        else:
            rows = features
        p = len(tokens)
        if p == 0 or gamma <= 0:
            return []
        size = bucket(p)
        if size not in self.rows:
            fc = self.model.fc.weight
            self.rows[size] = (torch.zeros(1, size, fc.shape[1], dtype=fc.dtype, device=self.device),
                               torch.zeros(1, size, dtype=torch.long, device=self.device))
        feats, ids = self.rows[size]
        feats[0, :p].copy_(rows[:p])
        ids[0, :p].copy_(torch.tensor(list(tokens), dtype=torch.long))
        self.p.fill_(p)
        return self._run((size,), gamma)

    def _round(self, key: tuple, gamma: int) -> Callable[[], Tensor]:
        model, (size,) = self.model, key
        feats, ids = self.rows[size]
        p, memory = self.p, self.memory
        K = memory[0].shape[2] if memory else 0                                  # video rows: positions 0..K-1

        def run() -> Tensor:
            rows = torch.arange(size, device=ids.device)
            keys = rows < p                                                       # real rows 0 .. p-1
            seen = keys.new_ones(K)
            causal = torch.cat([seen.expand(size, K), (rows[None, :] <= rows[:, None]) & keys], 1)  # [P, K + P]
            past: list = [tuple(memory)] if memory else []
            hidden, logits = model.step(ids, model.fc(feats), K + rows[None], past, causal)
            last = p - 1                                                          # chain p - 1
            hidden, logits = hidden.index_select(1, last), logits.index_select(1, last)
            tok = model.to_target(logits.argmax(-1))                              # [1, 1]: r_p
            out = [tok]
            for k in range(1, gamma):                  # its own hidden state and token, at position p - 1 + k
                keys = torch.cat([keys, keys.new_ones(1)])
                hidden, logits = model.step(tok, hidden, (K + last + k)[None], past, torch.cat([seen, keys])[None])
                tok = model.to_target(logits.argmax(-1))
                out.append(tok)
            return torch.cat(out, 1)[0]                                           # [gamma]
        return run
