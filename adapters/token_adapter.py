"""TokenAdapter: drafts the target's next tokens from the accepted target prefix, conditioned on
the draft model's free-running response.

One pre-norm transformer runs over two segments (learned positions restart in each segment,
a segment embedding tells them apart):

    [d_0 ... d_{m-1}]   [SEP  r_0  ...  r_{p-1}]
      draft segment       target segment (causal)

Position convention: target-segment position j predicts r_j (SEP is position 0 and predicts
r_0; r_{j-1} sits at position j). Proposing from an accepted prefix of length p therefore
reads the logits at target position p, exactly the round of specdec/metrics.py.

Draft conditioning is built so that it cannot hurt:
- the target segment attends to itself through a causal softmax, and to the draft segment
  through a *separate* softmax whose output is scaled by tanh(g_l), g_l = 0 at init (one gate
  per layer): with the gate closed, or the draft dropped, the model is exactly the prefix-only
  model;
- draft dropout: in training the whole draft segment is dropped per sample with probability
  `draft_dropout`, so the model stays a good prefix-only model;
- copy: a pointer over the draft tokens, mixed into the output distribution with
  lambda = sigmoid(w.h + b), b = -6 at init (lambda ~ 0.0025).
`condition_on_draft=False` builds the same model without the draft path: the ablation.

The drafter type (adapters/registry.py) below the model: trained on token pairs (TokenAdapterModule:
teacher-forced cross-entropy with draft dropout), online it reads EventGPT's response (`DraftResponse`),
and the same weights without the draft are its `no_draft` variant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from specalign.adapters.registry import (
    DRAFT_RESPONSE,
    ChainRuns,
    DrafterType,
    OnlineInputs,
    Pick,
    Variant,
    greedy,
    register,
    stacked,
)
from specalign.specdec.metrics import match_runs
from specalign.specdec.schedule import (
    CONCURRENT,
    DRAFT_SCHEDULES,
    SEQUENTIAL,
    StreamCosts,
    visible_length,
    visible_lengths,
)
from specalign.train.modules import DrafterModule, lengths_mask, masked_mean, topk_metrics
from torch import Tensor, nn

from specalign.errors import SpecalignError

COPY_GATE_BIAS = -6.0


@dataclass
class TokenAdapterConfig:
    vocab_size: int = 32000
    n_layer: int = 4
    d_model: int = 512
    n_head: int = 8
    d_ff: int = 2048
    max_len: int = 1024            # per segment
    dropout: float = 0.1
    condition_on_draft: bool = True
    draft_dropout: float = 0.5     # training only: drop the whole draft segment of a sample
    copy: bool = True              # pointer over draft tokens (needs condition_on_draft)
    draft_schedule: str = "full"   # full: the whole draft from round 0; streaming: what exists at each round
    stream_costs: dict = field(default_factory=dict)   # specdec/schedule.StreamCosts keys (default: H200)
    stream_max_tau: float = 6.0    # streaming training: tokens per round drawn per sample from [1, this]

    def __post_init__(self):
        self.stream_costs = {k: v for k, v in (self.stream_costs or {}).items()}   # a plain dict (from a DictConfig)
        if self.draft_schedule not in DRAFT_SCHEDULES:
            raise SpecalignError(f"adapter.draft_schedule must be one of {sorted(DRAFT_SCHEDULES)}, got "
                                 f"{self.draft_schedule!r}")
        if self.stream_max_tau < 1:
            raise SpecalignError(f"adapter.stream_max_tau must be at least 1 (a round adds a token), got "
                                 f"{self.stream_max_tau}")
        StreamCosts.from_dict(self.stream_costs)                 # a bad key stops here, before training

    @property
    def schedule(self) -> str | None:
        """The draft schedule it assumes (specdec/schedule.py); None without the draft."""
        return DRAFT_SCHEDULES[self.draft_schedule] if self.condition_on_draft else None

    @property
    def sep_id(self) -> int:
        return self.vocab_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TokenAdapterConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class DraftMemory:
    """What the target segment reads from an encoded draft segment."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v [B, nh, m, hd]
    hidden: torch.Tensor                        # [B, m, d] final draft states (pointer keys)
    mask: torch.Tensor                          # [B, m] bool, keys that may be attended; [B, T, m] per query
    tokens: torch.Tensor                        # [B, m] draft token ids


class Block(nn.Module):
    def __init__(self, c: TokenAdapterConfig):
        super().__init__()
        self.n_head = c.n_head
        self.ln1 = nn.LayerNorm(c.d_model)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.mlp = nn.Sequential(nn.Linear(c.d_model, c.d_ff), nn.GELU(), nn.Linear(c.d_ff, c.d_model),
                                 nn.Dropout(c.dropout))
        self.drop = nn.Dropout(c.dropout)

    def _qkv(self, x):  # [B, T, d] -> 3 x [B, nh, T, hd]
        B, T, _ = x.shape
        return self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)

    def _finish(self, x, a):  # a: [B, nh, T, hd]
        B, _, T, _ = a.shape
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, -1)))
        return x + self.mlp(self.ln2(x))

    def draft(self, xd):
        """Draft segment, causal self-attention -> (new stream, this layer's keys/values)."""
        q, k, v = self._qkv(xd)
        return self._finish(xd, F.scaled_dot_product_attention(q, k, v, is_causal=True)), (k, v)

    def target(self, xt, past=None, draft_kv=None, draft_mask=None, gate=None, self_mask=None):
        """Target segment: causal self-attention over (cached) target keys, plus the gated draft
        attention. With `past`, xt holds exactly one new position; `self_mask` [1, T_past + T] bool then
        says which of the keys it may attend (a padded, static prefix; default: all)."""
        q, k, v = self._qkv(xt)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self_mask, is_causal=past is None)
        if draft_kv is not None:
            mask = draft_mask[:, None, None, :] if draft_mask.dim() == 2 else draft_mask[:, None]  # [B, 1, 1|T, m]
            gate = gate.view(gate.shape[0], 1, -1, 1).to(a.dtype)                 # [B] | [B, T] -> [B, 1, 1|T, 1]
            a = a + gate * F.scaled_dot_product_attention(q, *draft_kv, attn_mask=mask)
        return self._finish(xt, a), (k, v)


class TokenAdapter(nn.Module):
    kind = "token_adapter"

    def __init__(self, config: TokenAdapterConfig):
        super().__init__()
        c = self.config = config
        self.tok = nn.Embedding(c.vocab_size + 1, c.d_model)  # + SEP
        self.pos = nn.Embedding(c.max_len + 1, c.d_model)     # target segment: SEP + max_len tokens
        self.seg = nn.Embedding(2, c.d_model)                 # 0 draft, 1 target
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.condition_on_draft:
            self.gate = nn.Parameter(torch.zeros(c.n_layer))
            if c.copy:
                self.ln_d = nn.LayerNorm(c.d_model)
                self.copy_q = nn.Linear(c.d_model, c.d_model, bias=False)
                self.copy_k = nn.Linear(c.d_model, c.d_model, bias=False)
                self.copy_gate = nn.Linear(c.d_model, 1)
        self.apply(_init)
        if c.condition_on_draft and c.copy:
            nn.init.constant_(self.copy_gate.bias, COPY_GATE_BIAS)

    @property
    def uses_copy(self) -> bool:
        return self.config.condition_on_draft and self.config.copy

    def _embed(self, ids, start, segment: int):  # ids [B, T] -> [B, T, d]; start: int, or positions [T]
        pos = start if torch.is_tensor(start) else torch.arange(start, start + ids.shape[1], device=ids.device)
        return self.drop(self.tok(ids) + self.pos(pos) + self.seg.weight[segment])

    def encode_draft(self, draft, draft_len) -> DraftMemory:
        """draft [B, m] (m >= 1, right padded), draft_len [B] -> the memory the target reads."""
        xd = self._embed(draft, 0, 0)
        kv = []
        for blk in self.blocks:
            xd, kv_l = blk.draft(xd)
            kv.append(kv_l)
        # key 0 always stays visible so an empty draft cannot make a softmax over nothing
        # (its contribution is multiplied by a zero gate anyway)
        pos = torch.arange(draft.shape[1], device=draft.device)
        mask = (pos < draft_len[:, None]) | (pos == 0)
        return DraftMemory(kv, self.ln_d(xd) if self.uses_copy else xd, mask, draft)

    def _decode(self, ids, start, memory, has_draft, past=None, self_mask=None):
        """Target segment ids [B, T] from position `start` -> (hidden [B, T, d], new per-layer cache).
        `self_mask`: see `Block.target`."""
        x = self._embed(ids, start, 1)
        cache = []
        for i, blk in enumerate(self.blocks):
            gate = torch.tanh(self.gate[i]) * has_draft if memory is not None else None
            x, kv = blk.target(x, past[i] if past else None, memory.kv[i] if memory else None,
                               memory.mask if memory else None, gate, self_mask)
            cache.append(kv)
        return self.ln_f(x), cache

    def _logprobs(self, h, memory, has_draft):
        """h [B, T, d] -> log-probabilities [B, T, V] (vocabulary mixed with the draft pointer)."""
        lp = F.log_softmax(self.head(h).float(), -1)
        if not self.uses_copy or memory is None:
            return lp
        B, T, _ = h.shape
        scores = self.copy_q(h) @ self.copy_k(memory.hidden).transpose(1, 2) / math.sqrt(h.shape[-1])
        mask = memory.mask if memory.mask.dim() == 3 else memory.mask[:, None, :]                # [B, 1|T, m]
        attn = scores.float().masked_fill(~mask, float("-inf")).softmax(-1)                      # [B, T, m]
        index = memory.tokens[:, None, :].expand(B, T, -1)
        p_copy = torch.zeros_like(lp).scatter_add_(2, index, attn)                               # [B, T, V]
        z = self.copy_gate(h).float()                                                             # [B, T, 1]
        on = has_draft.bool()[:, :, None] if has_draft.dim() == 2 else has_draft.bool()[:, None, None]
        log_lam = F.logsigmoid(z).masked_fill(~on, float("-inf"))
        log_keep = F.logsigmoid(-z).masked_fill(~on, 0.0)
        return torch.logaddexp(log_keep + lp, log_lam + p_copy.clamp_min(1e-30).log())

    def _memory(self, draft, draft_len, keep):
        """-> (memory or None, has_draft [B] float) for a batch of drafts."""
        if not self.config.condition_on_draft:
            return None, None
        if keep is not None and not self.training and not keep.any():
            return None, None      # no row reads its draft (the ablation): the same numbers, without encoding it
        if draft.shape[1] == 0:
            draft = draft.new_zeros(draft.shape[0], 1)
        has = (draft_len > 0) if keep is None else (draft_len > 0) & keep
        return self.encode_draft(draft, draft_len), has.float()

    def logits(self, draft, draft_len, target, keep=None, visible=None):
        """Teacher-forced, batched (training and validation).

        draft [B, m] right padded, draft_len [B], target [B, n] right padded (r_0..r_{n-1}),
        keep [B] bool: which samples keep their draft (None: all).
        visible [B, n] long (optional): how many draft tokens position j sees (a streaming draft, per query).
        Returns log-probabilities [B, n, V]; position j predicts r_j."""
        return self._teacher_forced(*self._memory(draft, draft_len, keep), target, visible)

    def _teacher_forced(self, memory, has, target, visible=None):
        """`logits` on an encoded draft. The draft segment is causal, so its first L keys are exactly the
        encoding of the draft cut to L tokens: a per-query mask over the whole draft is that cut, row by row."""
        if memory is not None and visible is not None:
            keys = torch.arange(memory.mask.shape[1], device=target.device)
            mask = memory.mask[:, None, :] & (keys < visible[..., None]) | (keys == 0)   # [B, n, m]
            memory, has = replace(memory, mask=mask), has[:, None] * (visible > 0)         # has [B, n]
        sep = target.new_full((target.shape[0], 1), self.config.sep_id)
        ids = torch.cat([sep, target[:, :-1]], 1)                       # [SEP, r_0 .. r_{n-2}]
        h, _ = self._decode(ids, 0, memory, has)
        return self._logprobs(h, memory, has)

    @torch.no_grad()
    def propose(self, draft_tokens: Sequence[int] | None, prefix: Sequence[int], gamma: int,
                pick: Pick = greedy) -> tuple[list[int], Tensor | None]:
        """One round: `gamma` tokens following the accepted target prefix r_0..r_{p-1}, given the draft
        model's whole free-running response (None or []: without the draft), each chosen by `pick` from
        the log-probabilities at its position. -> (tokens, q [k, V] or None)."""
        c = self.config
        gamma = min(gamma, c.max_len - len(prefix))
        if gamma <= 0:
            return [], None
        dev = self.head.weight.device
        draft = list(draft_tokens or [])[: c.max_len]
        memory, has = self._memory(torch.tensor([draft], dtype=torch.long, device=dev).view(1, -1),
                                   torch.tensor([len(draft)], device=dev), None)
        ids = torch.tensor([[c.sep_id, *prefix]], dtype=torch.long, device=dev)
        out, qs, past, start = [], [], None, 0
        for _ in range(gamma):
            h, past = self._decode(ids, start, memory, has, past)
            tok, q = pick(self._logprobs(h[:, -1:], memory, has)[0, -1])
            out.append(tok)
            qs.append(q)
            start += ids.shape[1]
            ids = torch.tensor([[tok]], device=dev)
        return out, stacked(qs)

    @torch.no_grad()
    def next_logprobs(self, batch: dict) -> Tensor:
        """A token-pair batch (train.datamodule.collate_tokens; `keep` [B] bool optional: which rows keep
        their draft) -> teacher-forced log-probabilities [B, n, V], row j after r[:j]."""
        return self.logits(batch["draft"], batch["draft_len"], batch["target"], batch.get("keep"))

    @torch.no_grad()
    def chain_runs(self, batch: dict, depth: int) -> ChainRuns:
        """Proposals depend on the prefix only (and the fixed draft): inside a round, proposal k counts only
        if proposals 0..k-1 were accepted, i.e. equal to r[p..p+k-1], and then its input is exactly the
        target prefix r[:p+k]. So the greedy proposal at position j is the teacher-forced argmax after
        r[:j], and one pass gives every round. Positions past max_len propose nothing (see `propose`).
        A streaming draft is not fixed: see `streaming_runs` (its runs hold for gamma = depth only)."""
        if self.streams(batch):
            return self.streaming_runs(batch, depth)
        target = batch["target"]                                                     # [B, n]
        hit = self.next_logprobs(batch).argmax(-1) == target
        hit &= torch.arange(target.shape[1], device=target.device) < batch["target_len"][:, None]
        cap = (self.config.max_len - torch.arange(target.shape[1], device=target.device)).clamp_min(0)
        return ChainRuns(match_runs(hit), cap.expand_as(target), batch["target_len"])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def tree_logprobs(self, draft_tokens: Sequence[int] | None, prefix: Sequence[int],
                      paths: list[list[int]]) -> Tensor:
        """The draft tree's hook (specdec/tree.py): log-probabilities [P, V] of the token after prefix + each
        path (paths of one length), in one teacher-forced pass over the P branches; -inf rows where the
        branch reaches max_len (`propose` proposes nothing there)."""
        c, dev = self.config, self.head.weight.device
        depth = len(paths[0])
        if len(prefix) + depth >= c.max_len:
            return torch.full((len(paths), c.vocab_size), float("-inf"), device=dev)
        draft = list(draft_tokens or [])[: c.max_len]
        memory, has = self._memory(torch.tensor([draft], dtype=torch.long, device=dev).view(1, len(draft)),
                                   torch.tensor([len(draft)], device=dev), None)
        if memory is not None:      # one encoding of the draft, read by every branch
            P = len(paths)
            memory = DraftMemory([(k.expand(P, -1, -1, -1), v.expand(P, -1, -1, -1)) for k, v in memory.kv],
                                 memory.hidden.expand(P, -1, -1), memory.mask.expand(P, -1),
                                 memory.tokens.expand(P, -1))
            has = has.expand(P)
        ids = torch.tensor([[c.sep_id, *prefix, *path] for path in paths], dtype=torch.long, device=dev)  # [P, T]
        h, _ = self._decode(ids, 0, memory, has)
        return self._logprobs(h[:, -1:], memory, has)[:, -1]                                          # [P, V]

    # ---- the streaming draft (specdec/schedule.py)
    @property
    def stream_costs(self) -> StreamCosts:
        return StreamCosts.from_dict(self.config.stream_costs)

    def streams(self, batch: dict) -> bool:
        """Whether the batch's drafts are read as they stream in (the concurrent schedule, a draft kept)."""
        keep = batch.get("keep")
        return self.config.schedule == CONCURRENT and (keep is None or bool(keep.any()))

    def sampled_visible(self, target: Tensor, train: bool) -> Tensor:
        """Streaming training: per sample a rate u of tokens per round, uniform in [1, stream_max_tau] (its mean
        in validation); position j is taken to be in round floor(j / u) and sees the draft tokens the schedule
        gives that round. target [B, n] -> visible [B, n]."""
        B, n = target.shape
        hi = self.config.stream_max_tau
        u = 1 + (hi - 1) * (torch.rand(B, 1, device=target.device) if train
                            else torch.full((B, 1), 0.5, device=target.device))
        rounds = (torch.arange(n, device=target.device) / u).floor().long()                  # [B, n]
        return visible_lengths(self.stream_costs, rounds)

    @torch.no_grad()
    def streaming_runs(self, batch: dict, gamma: int) -> ChainRuns:
        """Greedy chains at `gamma` under the concurrent schedule, exactly. A position is proposed in one round
        only (the round it falls in: proposals stop at the first miss, the next round starts after the bonus),
        and sees the draft tokens of that round's index, which depends on the earlier rounds. So: guess each
        position's round, score every position at once with that per-query cut (`_teacher_forced`), walk the
        rounds, and repeat with the walked rounds until they agree. The rounds before the first wrong guess are
        exact, so each pass fixes at least one more position: at most n + 1 passes, a few in practice."""
        from specalign.specdec.schedule import round_of_position

        target, length = batch["target"], batch["target_len"]
        B, n = target.shape
        pos = torch.arange(n, device=target.device)
        valid, cap = pos < length[:, None], (self.config.max_len - pos).clamp_min(0).expand_as(target)
        memory, has = self._memory(batch["draft"], batch["draft_len"], batch.get("keep"))
        rounds, costs = pos.expand(B, n), self.stream_costs                  # first guess: a token per round
        for passes in range(1, n + 2):
            lp = self._teacher_forced(memory, has, target, visible_lengths(costs, rounds))
            run = match_runs((lp.argmax(-1) == target) & valid)
            walked = round_of_position(run, cap, length, gamma)
            if torch.equal(walked, rounds):
                break
            rounds = walked
        self.streaming_passes = passes                                       # read by tests and benchmarks
        return ChainRuns(run, cap, length)


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------- the type

class TokenAdapterModule(DrafterModule):
    """Teacher-forced cross-entropy on the target tokens, the whole draft of a sample dropped with
    probability `draft_dropout`."""

    kind = "token_adapter"

    def losses(self, batch, train):
        target, c = batch["target"], self.model.config
        keep = None
        if train and c.condition_on_draft:
            keep = torch.rand(target.shape[0], device=target.device) >= c.draft_dropout
        visible = self.model.sampled_visible(target, train) if c.schedule == CONCURRENT else None
        lp = self.model.logits(batch["draft"], batch["draft_len"], target, keep, visible)   # [B, n, V]
        mask = lengths_mask(batch["target_len"], target.shape[1])
        nll = -lp.gather(-1, target[..., None])[..., 0]                            # [B, n]
        return {"loss": masked_mean(nll, mask), **topk_metrics(lp, target, mask)}


class DraftResponse(OnlineInputs):
    """Online, the TokenAdapter reads the draft model's free-running response (the engine's request);
    keep_draft=False: nothing, the trained model without its draft. With `costs` (the concurrent schedule)
    round i sees only the tokens the schedule says exist then (the response is still generated up front
    here; the schedule decides what is visible), so online equals the offline walk round by round."""

    def __init__(self, keep_draft: bool = True, costs: StreamCosts | None = None):
        self.keep_draft = keep_draft
        self.request = DRAFT_RESPONSE if keep_draft else None
        self.costs = costs if keep_draft else None
        self.schedule = (SEQUENTIAL if costs is None else CONCURRENT) if keep_draft else None
        self.draft: list[int] = []
        self.round = 0

    def begin(self, context) -> None:
        self.draft = [int(t) for t in context.request] if self.keep_draft else []
        self.round = 0

    def context(self, accepted: list[int]) -> list[int]:
        if self.costs is None:
            return self.draft
        return self.draft[: visible_length(self.costs, self.round)]

    def observe(self, accepted_tokens: list[int], hidden) -> None:
        self.round += 1


@register
class TokenAdapterType(DrafterType):
    kind = "token_adapter"
    model_class, config_class, module_class = TokenAdapter, TokenAdapterConfig, TokenAdapterModule

    def batch(self, model, store, rows, keep_draft: bool = True):
        batch = super().batch(model, store, rows)
        return {**batch, "keep": torch.full((len(rows),), keep_draft)}

    def variants(self, model):
        if not model.config.condition_on_draft:
            return {}
        return {"no_draft": Variant({"keep_draft": False}, (
            "'no_draft': the same weights with the draft segment removed (the model was trained with draft "
            "dropout); pass no_draft=DIR for a separately trained ablation."))}

    def online_inputs(self, model, draft_model, keep_draft: bool = True):
        return DraftResponse(keep_draft, model.stream_costs if model.config.schedule == CONCURRENT else None)

    def schedule(self, model, keep_draft: bool = True):
        return model.config.schedule if keep_draft else None

    def notes(self, model, name, mode):
        if model.config.schedule != CONCURRENT:
            return []
        c = model.stream_costs
        return [(f"'{name}' reads EventGPT's response as it streams in beside the target (the concurrent schedule, "
                f"specdec/schedule.py): a round every {1e3 * c.round_period_s:.3g} ms from {1e3 * c.target_prefill_s:.3g} "
                f"ms on sees the tokens EventGPT has made by then ({1e3 * c.draft_prefill_s:.3g} ms prefill, then one "
                f"every {1e3 * c.draft_step_s:.3g} ms); the expected acceptance under sampling reads its whole response.")]

    def static_proposer(self, model, cuda_graphs, compile):
        from specalign.specdec.fast_drafters import TokenAdapterProposer

        return TokenAdapterProposer(model, cuda_graphs, compile)

    def vocab_info(self, model):
        return {"vocab_size": model.config.vocab_size, "sep_id": model.config.sep_id}

    def row_context(self, model, store, row, keep_draft: bool = True):
        """EventGPT's response as `propose` reads it (none without the draft)."""
        return list(row.draft_tokens[: model.config.max_len]) if keep_draft else []
