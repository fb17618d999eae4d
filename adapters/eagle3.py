"""EAGLE-3 feature-fusion drafter, with training-time-test (TTT) unrolling.

Inputs at feature row i (row i of a store is the position whose next token is r_i):
the captured low/mid/high features of that row, fused by fc(k*3*H_src -> H), and the embedding
of r_i (frozen, the target's own `embed_tokens`). The 2H concatenation [embed, hidden] feeds
q/k/v of one LLaMA decoder layer; final norm; lm_head over a reduced draft vocabulary. Chain i
step 0 predicts r_{i+1}.

TTT (as EAGLE-3, SpecForge and speculators do it): step k re-runs the layer on every chain i
with the drafter's own step-(k-1) output hidden state of chain i and the token r_{i+k}, at rope
position i+k, and predicts r_{i+k+1}. Keys/values of all steps are concatenated; the query of
chain i at step k attends to

    step-0 keys of rows j <= i    (the real features: causal)
    step-s keys of chain i only   (s = 1..k: its own earlier drafts, the diagonal)

i.e. indexed by sequence position t = i + k, step k sees real features only at rows <= t - k.
This is exactly what inference does with a KV cache: `propose` runs step 0 over the accepted
rows 0..p-1 and then unrolls chain p-1 on its own hidden states and its own greedy tokens.

Draft vocabulary (EAGLE-3 / speculators): the `draft_vocab_size` most frequent target tokens,
kept in id order; d2t[d] = target_id - d (so target_id = d + d2t[d]), t2d[t] = t is in it.

The drafter type (adapters/registry.py) below the model: trained on store features (Eagle3Module,
FeatureDataModule), online it gathers the same features from the engine and EventGPT
(`FeatureInputs`), and it is exported in the native and in the speculators (vLLM) layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from specalign.adapters.registry import (
    DRAFT_PREFILL,
    ChainRuns,
    DrafterType,
    OnlineInputs,
    Pick,
    greedy,
    register,
    stacked,
)
from specalign.data.features import PROMPT, PROMPT_TOKEN, VIDEO, context_name, feature_name, parse_feature
from specalign.data.store import FeatureStore
from specalign.train.modules import DrafterModule, lengths_mask, masked_mean, topk_metrics
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    rotate_half,
)

from specalign.errors import DataError, SpecalignError, StoreMismatch

FEATURE_SOURCES = ("target", "draft", "both")


@dataclass
class Eagle3Config:
    hidden_size: int = 4096              # H: the target's hidden size (its embeddings are used)
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    vocab_size: int = 32064              # target vocabulary (embedding rows)
    draft_vocab_size: int = 32000
    feature_source: str = "target"
    feature_names: list[str] = field(default_factory=list)  # store tensors fused by fc, in order
    fc_in_features: int = 3 * 4096       # sum of their widths
    aux_layer_ids: list[int] = field(default_factory=list)  # target layers (speculators' aux ids)
    norm_before_residual: bool = False
    ttt_steps: int = 7
    ttt_decay: float = 0.8
    # prompt context (store format 2): the prompt row (position P - 2, paired with the last prompt token, lets
    # the first round propose r_0) and K pooled video rows, read as K extra keys every chain attends to
    prompt_context: bool = False
    context_features: list[str] = field(default_factory=list)   # feature_names the context holds (others: 0)
    video_rows: int = 0                  # K
    video_token_id: int | None = None    # the target's video placeholder id (online: where the video is)

    def __post_init__(self):
        if self.feature_source not in FEATURE_SOURCES:
            raise ValueError(f"feature_source must be one of {FEATURE_SOURCES}, got {self.feature_source!r}")

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                           num_attention_heads=self.num_attention_heads,
                           num_key_value_heads=self.num_key_value_heads, num_hidden_layers=1,
                           rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
                           max_position_embeddings=self.max_position_embeddings, vocab_size=self.vocab_size,
                           hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Eagle3Config:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def build_vocab_maps(counts: torch.Tensor, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """counts [V_t] target-token frequencies -> d2t int64 [N] offsets, t2d bool [V_t].

    The N most frequent ids (ties broken by the smaller id), kept in increasing id order."""
    order = torch.argsort(-counts.long(), stable=True)[:draft_vocab_size]
    ids = order.sort().values
    t2d = torch.zeros(counts.shape[0], dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(len(ids)), t2d


def fuse_features(get: Callable[[str], torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """One response's drafter input: get(name) -> [n, H_name] store rows (e.g.
    `lambda k: store.hidden(row, k)`), concatenated in `names` order (config.feature_names)
    -> [n, fc_in]."""
    return torch.cat([get(name) for name in names], -1)


class PromptRows(NamedTuple):
    """The drafter input of one response with its prompt context (`propose`'s `features`)."""

    rows: Tensor        # [n, fc_in] fused feature rows (`fuse_features`)
    prompt: Tensor      # [fc_in] the prompt row (vlms.alignment.prompt_row_position)
    token: int          # the last prompt token, embedded beside the prompt row
    video: Tensor       # [K, fc_in] the pooled video rows


def fuse_context(get: Callable[[str], Tensor], names: Sequence[str], present: Sequence[str]) -> Tensor:
    """A context's fused rows: get(name) -> [m, H_name] for the names in `present` (the store's context
    features); the parts of the other names (EventGPT's, with feature_source both) are zeros -> [m, fc_in]."""
    parts = {n: get(n) for n in names if n in present}
    like = next(iter(parts.values()))
    return torch.cat([parts.get(n, like.new_zeros(like.shape)) for n in names], -1)


def context_inputs(store: FeatureStore, row, names: Sequence[str], present: Sequence[str]) -> dict:
    """A store row's prompt context as one batch item: prompt [fc_in], prompt_token [] and video [K, fc_in]
    (data/features.py names; `fuse_context`)."""
    return {"prompt": fuse_context(lambda n: store.context(row, context_name(PROMPT, n)), names, present)[0],
            "prompt_token": store.context(row, PROMPT_TOKEN)[0],
            "video": fuse_context(lambda n: store.context(row, context_name(VIDEO, n)), names, present)}


def require_context(store: FeatureStore, config: Eagle3Config) -> None:
    """A store must carry the prompt context a drafter with prompt_context reads: else one line naming the
    store and the command that writes one."""
    spec = store.context_spec
    needed = [n for n in config.feature_names if parse_feature(n)[0] == "target"]
    if spec is None or not set(needed) <= set(spec.get("features", [])) or spec.get("video_rows") != config.video_rows:
        have = "none" if spec is None else f"{spec.get('features')} x {spec.get('video_rows')} video rows"
        raise StoreMismatch(f"{store.root}: this EAGLE-3 drafter reads the prompt context ({needed} x "
                            f"{config.video_rows} video rows), the store holds {have} (format version "
                            f"{store.manifest.get('format_version')}); re-extract it with `specalign extract "
                            f"out=NEW_STORE` (store format 2), or train with adapter.prompt_context=false")


class Eagle3Attention(nn.Module):
    """LLaMA attention whose q/k/v read the 2H input [embed, hidden]; keys/values of earlier
    TTT steps (or of the cache) come in as `past`."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(2 * c.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, past, mask):
        """x [B, T, 2H]; past: list of (k, v) [B, n_kv, T_s, hd]; mask [T, T_total] bool or None
        (None: attend to everything). -> (out [B, T, H], (k, v) of this call)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys = torch.cat([p[0] for p in past] + [k], 2)
        values = torch.cat([p[1] for p in past] + [v], 2)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                           enable_gqa=self.n_head != self.n_kv)
        return self.o_proj(a.transpose(1, 2).reshape(B, T, -1)), (k, v)

    def kv(self, x, cos, sin):
        """Keys and values only, x [B, K, 2H] -> (k, v) [B, n_kv, K, hd]: rows that are attended to and
        predict nothing (the video context)."""
        B, K, _ = x.shape
        k = self.k_proj(x).view(B, K, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, K, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return k * cos + rotate_half(k) * sin, v


class Eagle3DecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig, norm_before_residual: bool):
        super().__init__()
        self.norm_before_residual = norm_before_residual
        self.input_layernorm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps)   # on the embedding
        self.hidden_norm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps)       # on the hidden state
        self.self_attn = Eagle3Attention(c)
        self.post_attention_layernorm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = LlamaMLP(c)

    def forward(self, emb, hidden, cos, sin, past, mask):
        """emb, hidden [B, T, H] -> (hidden [B, T, H], (k, v))."""
        h = self.hidden_norm(hidden)
        residual = h if self.norm_before_residual else hidden
        a, kv = self.self_attn(torch.cat([self.input_layernorm(emb), h], -1), cos, sin, past, mask)
        h = residual + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv

    def memory(self, emb, hidden, cos, sin):
        """(k, v) of context rows: the same q/k/v input [embed, hidden] as `forward`, no query."""
        return self.self_attn.kv(torch.cat([self.input_layernorm(emb), self.hidden_norm(hidden)], -1), cos, sin)


class Eagle3Drafter(nn.Module):
    """State-dict names follow the speculators layout: fc, layers.0.*, norm, lm_head,
    embed_tokens, d2t, t2d."""

    kind = "eagle3"

    def __init__(self, config: Eagle3Config):
        super().__init__()
        c = self.config = config
        lc = c.llama_config()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)   # the target's, frozen
        self.fc = nn.Linear(c.fc_in_features, c.hidden_size, bias=False)
        self.layers = nn.ModuleList([Eagle3DecoderLayer(lc, c.norm_before_residual)])
        self.norm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(lc)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool))
        # The video summary enters as K prepended rows, as the prompt positions a serving engine runs the drafter
        # over, only pooled: a learned embedding per row in place of a token's, fc over its pooled features. One
        # layer computes their keys/values from their inputs alone (no attention), so they cost K keys per query
        # and nothing else, and the TTT mask leaves them visible to every chain at every step.
        if c.prompt_context:
            self.context_embed = nn.Parameter(torch.randn(c.video_rows, c.hidden_size) * 0.02)

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def step(self, ids, hidden, positions, past, mask):
        """One pass of the layer. ids [B, T] target ids, hidden [B, T, H], positions [1, T].
        Appends this pass's keys/values to `past`. -> (hidden out [B, T, H], logits [B, T, N])."""
        cos, sin = self.rotary_emb(hidden, positions)
        h, kv = self.layers[0](self.embed_tokens(ids), hidden, cos, sin, past, mask)
        past.append(kv)
        return h, self.lm_head(self.norm(h))

    def memory(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """The video rows' keys and values: video [B, K, fc_in] at positions 0..K-1 -> (k, v)."""
        B, K, _ = video.shape
        hidden = self.fc(video.to(self.fc.weight.dtype))
        cos, sin = self.rotary_emb(hidden, torch.arange(K, device=video.device)[None])
        return self.layers[0].memory(self.context_embed.to(hidden.dtype).expand(B, K, -1), hidden, cos, sin)

    def with_context(self, feats: Tensor, tokens: Tensor, context: dict | None):
        """A batch's sequence as the layer reads it. Without context: (feats, tokens, [], 0). With it
        (prompt [B, fc_in], prompt_token [B], video [B, K, fc_in]): the prompt row and the last prompt token
        go first, so chain j reads row j - 1 and predicts r_j, and chain 0 proposes r_0; the video rows'
        keys come as a first `past` entry; positions start after them. -> (feats [B, T', fc_in],
        tokens [B, T'], past, K)."""
        if context is None:
            return feats, tokens, [], 0
        feats = torch.cat([context["prompt"][:, None].to(feats.dtype), feats], 1)
        tokens = torch.cat([context["prompt_token"][:, None].to(tokens.dtype), tokens], 1)
        return feats, tokens, [self.memory(context["video"])], context["video"].shape[1]

    def context_of(self, batch: dict) -> dict | None:
        """The batch's prompt context, or None for a drafter without one; a batch that lacks what the drafter
        reads is refused."""
        if not self.config.prompt_context:
            return None
        if "video" not in batch:
            raise SpecalignError("this EAGLE-3 drafter reads the prompt context (prompt_context: true) and the "
                                 "batch has none: use a store written by `specalign extract` (store format 2)")
        return {k: batch[k] for k in ("prompt", "prompt_token", "video")}

    def _unroll(self, feats: Tensor, tokens: Tensor, steps: int, context: dict | None = None) -> Iterator[Tensor]:
        """The TTT passes one by one: step k's logits [B, T', N] (see `ttt`; T' = T + 1 with context)."""
        feats, tokens, past, K = self.with_context(feats, tokens, context)
        T = tokens.shape[1]
        dev = tokens.device
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        diag = torch.eye(T, dtype=torch.bool, device=dev)
        seen = torch.ones(T, K, dtype=torch.bool, device=dev)             # the video rows: always visible
        pos = K + torch.arange(T, device=dev)[None]
        hidden = self.fc(feats.to(self.fc.weight.dtype))
        for k in range(steps):
            ids = F.pad(tokens[:, k:], (0, k))                          # chain i reads r_{i+k}
            mask = torch.cat([seen, causal] + [diag] * k, 1)            # [T, K + (k+1) T]
            hidden, logits = self.step(ids, hidden, pos + k, past, mask)
            yield logits

    def ttt(self, feats: Tensor, tokens: Tensor, steps: int | None = None, context: dict | None = None
            ) -> list[Tensor]:
        """Training-time test. feats [B, T, fc_in] (row i), tokens [B, T] (r_i), right padded.
        Returns per step k the logits [B, T, N] of every chain i, predicting r_{i+k+1}; with `context`
        ([B, T + 1, N]; see `with_context`) chain i predicts r_{i+k}."""
        return list(self._unroll(feats, tokens, self.config.ttt_steps if steps is None else steps, context))

    def target_logits(self, logits: Tensor) -> Tensor:
        """Draft-vocabulary logits [..., N] -> [..., V_target], -inf outside the draft vocabulary."""
        out = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        out[..., self.to_target(torch.arange(logits.shape[-1], device=logits.device))] = logits
        return out

    @torch.no_grad()
    def next_logprobs(self, batch: dict) -> Tensor:
        """A feature batch (tokens [B, T], feats [B, T, fc_in]) -> teacher-forced step-0 log-probabilities
        [B, T, V_target], row j for r_j (chain j-1), -inf outside the draft vocabulary. Row 0 is -inf
        everywhere: r_0 is the target's own first token (see `propose`)."""
        tokens, context = batch["tokens"], self.context_of(batch)
        lp = next(self._unroll(batch["feats"], tokens, 1, context)).float().log_softmax(-1)   # [B, T', N]
        if context is not None:                                                         # chain j predicts r_j
            return self.target_logits(lp)[:, : tokens.shape[1]]
        return F.pad(self.target_logits(lp)[:, :-1], (0, 0, 1, 0), value=float("-inf"))

    @torch.no_grad()
    def chain_runs(self, batch: dict, depth: int) -> ChainRuns:
        """The TTT unroll is the in-round unrolling: step k of chain i reads r_{i+k}, which is the
        drafter's own step-(k-1) token for as long as the chain is accepted, so `depth` batched passes
        give every round. The chain of prefix p is chain p - 1; p = 0 proposes nothing, unless the prompt
        context is read: then the chain of prefix p is chain p of the sequence that starts with the prompt row
        (`with_context`), and p = 0 proposes too."""
        tokens, length, context = batch["tokens"], batch["length"], self.context_of(batch)   # [B, T], [B]
        B, T = tokens.shape
        seq = tokens if context is None else F.pad(tokens, (1, 0))        # the labels: tokens of the sequence
        S = seq.shape[1]
        running = torch.ones(B, S, dtype=torch.bool, device=tokens.device)           # chain i accepted so far
        run = torch.zeros(B, S, dtype=torch.long, device=tokens.device)
        for k, logits in enumerate(self._unroll(batch["feats"], tokens, max(1, min(depth, S - 1)), context)):
            hit = self.to_target(logits[:, : S - k - 1].argmax(-1)) == seq[:, k + 1:]    # chain i -> seq_{i+k+1}
            running &= F.pad(hit, (0, k + 1), value=False)
            run += running
        if context is None:
            run = F.pad(run[:, :-1], (1, 0))                                           # position p: chain p-1
            cap = torch.full_like(run, depth).index_fill_(1, torch.tensor([0], device=run.device), 0)
        else:
            run = run[:, :T]                                                           # position p: chain p
            cap = torch.full_like(run, depth)
        return ChainRuns(run.minimum(length[:, None] - torch.arange(T, device=run.device)).clamp_min(0), cap, length)

    @torch.no_grad()
    def propose(self, features: Tensor, tokens: Sequence[int], gamma: int,
                pick: Pick = greedy) -> tuple[list[int], Tensor | None]:
        """One round from the accepted prefix r_0..r_{p-1} (p = len(tokens)), each token chosen by `pick`
        from the logits over the target vocabulary (-inf outside the draft vocabulary).

        features: the fused rows of this response (`fuse_features`), at least p of them; only
        rows 0..p-1 (known once r_{p-1} is accepted) are read. Returns gamma target ids for
        r_p, r_{p+1}, ... and q (None when greedy). With p = 0 there is no accepted token to embed:
        returns [] (the round then yields the target's own first token, as EAGLE's prefill does), unless
        `features` is a `PromptRows` (a drafter with prompt_context): its prompt row proposes r_0 on."""
        prefix = self._prefix(features, tokens) if gamma > 0 else None
        if prefix is None:
            return [], None
        hidden, logits, past, start = prefix
        dev = self.fc.weight.device
        out, qs = [], []
        for k in range(1, gamma + 1):
            tok, q = pick(self.target_logits(logits[0, -1].float()))
            out.append(tok)
            qs.append(q)
            if k < gamma:
                hidden, logits = self.step(torch.tensor([[tok]], device=dev), hidden,
                                           torch.tensor([[start + k]], device=dev), past, None)
        return out, stacked(qs)

    def _prefix(self, features, tokens: Sequence[int]):
        """The step over the accepted prefix r_0..r_{p-1} (and the prompt context): the chain of prefix p ->
        (hidden [1, 1, H], logits [1, 1, N], past, the position of that chain's last row), or None when
        nothing can be proposed (p = 0 without a prompt context)."""
        p = len(tokens)
        context = self.prompt_rows(features)
        if p == 0 and context is None:
            return None
        dev, dtype = self.fc.weight.device, self.fc.weight.dtype
        rows = features.rows if context is not None else features
        feats = rows[:p].to(dev, dtype)[None]                               # [1, p, fc_in]
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=dev)[None]
        if context is not None:
            context = {k: v.to(dev) for k, v in context.items()}
        feats, ids, past, K = self.with_context(feats, ids, context)       # [1, n, fc_in]: n = p (+ 1)
        n = ids.shape[1]
        mask = torch.cat([torch.ones(n, K, dtype=torch.bool, device=dev),
                          torch.ones(n, n, dtype=torch.bool, device=dev).tril()], 1)
        hidden, logits = self.step(ids, self.fc(feats), K + torch.arange(n, device=dev)[None], past, mask)
        return hidden[:, -1:], logits[:, -1:], past, K + n - 1

    def prompt_rows(self, features) -> dict | None:
        """`propose`'s features -> the batch-of-one prompt context (`with_context`), None without one."""
        if not self.config.prompt_context:
            return None
        if not isinstance(features, PromptRows):
            raise SpecalignError("this EAGLE-3 drafter reads the prompt context (prompt_context: true): give "
                                 "`propose` a PromptRows (its FeatureInputs do)")
        return {"prompt": features.prompt[None].to(self.fc.weight.dtype),
                "prompt_token": torch.tensor([int(features.token)]), "video": features.video[None]}

    def num_params(self) -> int:
        """Trainable parameters (the frozen target embeddings excluded)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @torch.no_grad()
    def tree_logprobs(self, features, tokens: Sequence[int], paths: list[list[int]]) -> Tensor:
        """The draft tree's hook (specdec/tree.py): log-probabilities [P, V_target] of the token after the
        prefix + each path (paths of one length d). The prefix runs once as in `propose` (its prompt context
        included); then the P branches unroll side by side, d steps, each on its own hidden states and tokens
        (batch P), attending the shared prefix keys and its own earlier steps. -inf outside the draft
        vocabulary, and everywhere at p = 0 without a prompt context (no token to embed)."""
        P, dev = len(paths), self.fc.weight.device
        prefix = self._prefix(features, tokens)
        if prefix is None:
            return torch.full((P, self.config.vocab_size), float("-inf"), device=dev)
        hidden, logits, past, start = prefix
        hidden, logits = hidden.expand(P, 1, -1), logits.expand(P, 1, -1)
        past[:] = [tuple(t.expand(P, -1, -1, -1) for t in kv) for kv in past]
        branch = torch.tensor(paths, dtype=torch.long, device=dev).view(P, len(paths[0]))   # [P, d]
        for k in range(1, branch.shape[1] + 1):
            hidden, logits = self.step(branch[:, k - 1: k], hidden, torch.tensor([[start + k]], device=dev), past,
                                       None)
        return self.target_logits(logits[:, -1].float()).log_softmax(-1)                 # [P, V_target]


# ---------------------------------------------------------------------------------------------- training

def token_counts(store: FeatureStore, split: str, vocab_size: int) -> Tensor:
    toks = [t for r in store.select(split) for t in r.target_tokens]
    return torch.bincount(torch.tensor(toks, dtype=torch.long), minlength=vocab_size)[:vocab_size]


class Eagle3Module(DrafterModule):
    """Soft cross-entropy to the target's distribution restricted to the draft vocabulary
    (teacher logits = target.final @ target.lm_head[draft ids].T, recomputed here), summed over
    TTT steps with weight ttt_decay^k, on response rows only (padding masked)."""

    kind = "eagle3"

    @torch.no_grad()
    def init_from_store(self, store: FeatureStore, split: str) -> None:
        """Draft vocabulary from the split's token frequencies; the target's embeddings (frozen)
        and LM head rows (teacher, and the drafter head's starting point)."""
        m, c = self.model, self.model.config
        heads = store.heads()
        embed, head = heads["target.embed_tokens"], heads["target.lm_head"]
        if embed.shape != (c.vocab_size, c.hidden_size) or head.shape != embed.shape:
            raise StoreMismatch(f"{store.root}: target heads are {tuple(head.shape)}/{tuple(embed.shape)}, "
                                f"the drafter expects {(c.vocab_size, c.hidden_size)}")
        d2t, t2d = build_vocab_maps(token_counts(store, split, c.vocab_size), c.draft_vocab_size)
        m.d2t.copy_(d2t)
        m.t2d.copy_(t2d)
        m.embed_tokens.weight.copy_(embed)
        self.register_buffer("teacher_head", head[torch.arange(c.draft_vocab_size) + d2t].clone(), persistent=False)
        m.lm_head.weight.copy_(self.teacher_head)

    def losses(self, batch, train):
        m, c = self.model, self.model.config
        tokens, context = batch["tokens"], m.context_of(batch)                     # [B, T]
        valid = lengths_mask(batch["length"], tokens.shape[1])
        with torch.no_grad():                                                     # row j predicts r_j
            teacher = (batch["final"].to(self.teacher_head.dtype) @ self.teacher_head.T).float().softmax(-1)
        feats = batch["feats"]
        if context is not None:   # the sequence starts with the last prompt token (`with_context`), never a label
            tokens, valid = F.pad(tokens, (1, 0)), F.pad(valid, (1, 0), value=True)
            teacher = F.pad(teacher, (0, 0, 1, 0))
        T = tokens.shape[1]
        out = {"loss": 0.0}
        steps = max(1, min(c.ttt_steps, T - 1))
        for k, logits in enumerate(m.ttt(feats, batch["tokens"], steps, context)):
            mask = valid[:, k + 1:]                                               # chain i -> r_{i+k+1}
            labels, lg = tokens[:, k + 1:], logits[:, : T - k - 1]                # lg [B, T-k-1, N]
            ce = F.cross_entropy(lg.flatten(0, 1).float(), teacher[:, k + 1:].flatten(0, 1), reduction="none")
            loss_k = masked_mean(ce.view_as(labels), mask)
            out["loss"] = out["loss"] + c.ttt_decay ** k * loss_k
            out[f"acc_{k}"] = masked_mean((m.to_target(lg.argmax(-1)) == labels).float(), mask)
            if k == 0:
                out.update(topk_metrics(lg, labels, mask, m.to_target), loss_0=loss_k)
        return out


# ---------------------------------------------------------------------------------------------- online

class FeatureInputs(OnlineInputs):
    """EAGLE-3 online, on the features of the accepted prefix, row j being the hidden state at the
    position that predicts r_j (vlms/alignment.py), as in the feature store:
    - target features come from the engine: the prompt's last position from `begin`, then one row per
      token that enters the target cache from `observe` (the engine runs with `hidden_layers`);
    - draft features (feature_source draft/both) come from EventGPT run teacher-forced on the accepted
      prefix through its own KV cache: `begin` runs its prefill (the engine's request is the draft
      prefill), each `context` feeds the tokens accepted since the last round but the newest one. The
      accepted prefix only grows, so the cache is never rolled back; the cost is one draft forward of
      about tau tokens per round, timed as part of the drafting.
    Features are rounded to `feature_dtype`, the feature store's dtype the drafter was trained on."""

    request = DRAFT_PREFILL

    def __init__(self, names: Sequence[str], draft_model=None, feature_dtype: torch.dtype = torch.bfloat16,
                 config: Eagle3Config | None = None):
        self.names, self.draft_model, self.feature_dtype = list(names), draft_model, feature_dtype
        self.config = config if config is not None and config.prompt_context else None   # reads the prompt context
        self.layers = {n: online_layer(n) for n in self.names}
        self.hidden_layers = self._layers_of("target")
        self.draft_layers = self._layers_of("draft")
        if self.draft_layers and draft_model is None:
            raise SpecalignError(f"this EAGLE-3 drafter reads draft features {self.names}: give the draft model")

    def _layers_of(self, source: str) -> list[int]:
        return [layer for model, layer in self.layers.values() if model == source]

    def _keep(self, source: str, hidden: dict[int, Tensor]) -> None:
        for name, (model, layer) in self.layers.items():
            if model == source:
                self.rows[name].append(hidden[layer].to(self.feature_dtype))

    def begin(self, context) -> None:
        from specalign.specdec.online import run_prefill

        self.rows: dict[str, list[Tensor]] = {n: [] for n in self.names}
        self._keep("target", {i: h[-1:] for i, h in (context.hidden or {}).items()})
        self.prompt = self._prompt_context(context) if self.config is not None else None
        if self.draft_layers:
            pre = run_prefill(self.draft_model, context.request, self.draft_layers)
            self.draft_cache, self.fed = pre.cache, 0       # response tokens in the draft cache
            self._keep("draft", {i: h[-1:] for i, h in pre.hidden.items()})

    def _prompt_context(self, context) -> PromptRows:
        """The prompt row, the last prompt token and the video summary from the target's prefill hidden states
        (vlms/alignment.py), rounded as the store rounds them: what extraction stores for the same prompt."""
        from specalign.vlms.alignment import prompt_row_position, video_summary

        c = self.config
        ids = context.prefill.get("input_ids") if isinstance(context.prefill, dict) else None
        if ids is None or not context.hidden or c.video_token_id is None:
            raise SpecalignError("an EAGLE-3 drafter with the prompt context needs the target's prefill as a dict "
                                 "with input_ids, its hidden states, and the video token id in its config")
        ids = ids[0].cpu()

        def part(kind: str):
            def get(name: str) -> Tensor:
                h = context.hidden[self.layers[name][1]]
                if kind == PROMPT:
                    return h[prompt_row_position(len(ids))][None].float()
                return video_summary(h, ids.to(h.device), c.video_token_id, c.video_rows)
            return lambda name: get(name).to(self.feature_dtype)

        prompt = fuse_context(part(PROMPT), self.names, c.context_features)[0]
        return PromptRows(torch.empty(0), prompt, int(ids[-1]), fuse_context(part(VIDEO), self.names,
                                                                            c.context_features))

    def _feed_draft(self, accepted: list[int]) -> None:
        """Draft rows up to the one predicting the newest accepted token: feed r[fed : p - 1]."""
        from specalign.specdec.online import forward_tokens

        new = accepted[self.fed: len(accepted) - 1]
        if new:
            self._keep("draft", forward_tokens(self.draft_model, self.draft_cache, new, self.draft_layers)[1])
            self.fed += len(new)

    def context(self, accepted: list[int]) -> Tensor:
        """The fused rows of the accepted prefix: [p, fc_in]."""
        if self.draft_layers:
            self._feed_draft(accepted)
        rows = fuse_features(lambda n: torch.cat(self.rows[n])[: len(accepted)], self.names)
        return rows if self.prompt is None else self.prompt._replace(rows=rows)

    def observe(self, accepted_tokens: list[int], hidden: dict[int, Tensor] | None) -> None:
        if hidden:
            self._keep("target", hidden)


def online_layer(name: str) -> tuple[str, int]:
    """'target.h4' -> ('target', 4): online, only captured decoder-layer inputs can be read."""
    model, layer = parse_feature(name)
    if layer is None:
        raise SpecalignError(f"online EAGLE-3 reads captured decoder-layer inputs ('target.hN' / 'draft.hN'), "
                             f"not {name!r}")
    return model, layer


# ---------------------------------------------------------------------------------------------- the type

@register
class Eagle3Type(DrafterType):
    kind = "eagle3"
    model_class, config_class, module_class = Eagle3Drafter, Eagle3Config, Eagle3Module

    def configure(self, adapter: dict, store: FeatureStore, split: str) -> Eagle3Config:
        if not store.has_hidden:
            raise DataError(store.root, "EAGLE-3 training needs hidden states, this is a tokens-only store",
                            "use a store written by `specalign extract`")
        a, target = adapter, store.manifest["target"]
        H, V = target["hidden_size"], target["vocab_size"]
        sources = ["target", "draft"] if a["feature_source"] == "both" else [a["feature_source"]]
        names = [n for s in sources for n in store.feature_names(s)[:3]]   # low/mid/high, not final
        row = store.select(split)[0]
        heads = a["num_attention_heads"] or max(1, H // 128)
        spec = store.context_spec or {}
        context = bool(a.get("prompt_context", False)) and a["feature_source"] != "draft"  # target features only
        config = Eagle3Config(
            hidden_size=H, intermediate_size=a["intermediate_size"] or 11008 * H // 4096,
            num_attention_heads=heads, num_key_value_heads=a["num_key_value_heads"] or heads,
            rms_norm_eps=a["rms_norm_eps"], rope_theta=a["rope_theta"], vocab_size=V,
            draft_vocab_size=min(a["draft_vocab_size"], V), feature_source=a["feature_source"],
            feature_names=names, fc_in_features=sum(store.hidden(row, n).shape[-1] for n in names),
            aux_layer_ids=store.layers("target"), ttt_steps=a["ttt_steps"], ttt_decay=a["ttt_decay"],
            prompt_context=context, context_features=[n for n in names if n in spec.get("features", [])],
            video_rows=int(spec.get("video_rows", 0)), video_token_id=spec.get("video_token_id"))
        if context:
            config.context_features = config.context_features or [n for n in names if n.startswith("target.")]
            config.video_rows = config.video_rows or 1
            require_context(store, config)
        return config

    def data_module(self, store: str, config: Eagle3Config, **loader):
        from specalign.train.datamodule import FeatureDataModule

        context = None
        if config.prompt_context:
            context = partial(context_inputs, names=config.feature_names, present=config.context_features)
        return FeatureDataModule(store, config.feature_names, context=context, **loader)

    def batch(self, model, store, rows, **options):
        """tokens [B, T], length [B], feats [B, T, fc_in] (zero padded): what `chain_runs` and
        `next_logprobs` read of a training batch."""
        from specalign.train.datamodule import PAD_ID, collate_context, pad

        c = model.config
        names = c.feature_names
        context = [context_inputs(store, r, names, c.context_features) for r in rows] if c.prompt_context else [{}]
        return {"tokens": pad([torch.tensor(r.target_tokens, dtype=torch.long) for r in rows], PAD_ID),
                "length": torch.tensor([len(r.target_tokens) for r in rows]),
                "feats": pad([fuse_features(lambda n, r=r: store.hidden(r, n), names) for r in rows]),
                **collate_context(context)}

    def check_store(self, model, store) -> None:
        names = model.config.feature_names
        parsed = [parse_feature(n) for n in names]
        missing = [n for n, (m, layer) in zip(names, parsed) if layer is not None and layer not in store.layers(m)]
        if not store.has_hidden or missing:
            raise StoreMismatch(f"{store.root}: this EAGLE-3 drafter reads {names}, which the store does not "
                                "have; evaluate it on a store from `specalign extract` with the same models")
        if model.config.prompt_context:
            require_context(store, model.config)

    def notes(self, model, name, mode):
        c = model.config
        if c.prompt_context:
            first = (f"with the prompt context (the prompt row and {c.video_rows} pooled video rows of the "
                     "target's prefill), so its first round proposes too")
        else:
            first = "its first round of each response proposes nothing (no accepted token to embed yet)"
        if mode == "offline":
            return [f"'{name}': EAGLE-3 on {c.feature_source} features; {first}."]
        notes = [f"'{name}': EAGLE-3 on {c.feature_names}; {first}."]
        if any(parse_feature(n)[0] == "draft" for n in c.feature_names):
            notes.append(f"'{name}': its EventGPT features cost a draft prefill per request (its setup) and one "
                         "draft forward over the newly accepted tokens per round (inside its drafting time).")
        return notes

    def online_inputs(self, model, draft_model, **options):
        return FeatureInputs(model.config.feature_names, draft_model, config=model.config)

    def static_proposer(self, model, cuda_graphs, compile):
        from specalign.specdec.fast_drafters import Eagle3Proposer

        return Eagle3Proposer(model, cuda_graphs, compile)

    def vocab_info(self, model):
        c = model.config
        return {"target_vocab_size": c.vocab_size, "draft_vocab_size": c.draft_vocab_size,
                "maps": "d2t (int64 [draft], target = draft + d2t[draft]) and t2d (bool [target]) "
                        "in model.safetensors"}

    def to_speculators(self, model, extra: dict) -> dict:
        """The speculators/vLLM config.json of an EAGLE-3 drafter fed by target features."""
        c = model.config
        if c.feature_source != "target":
            raise SpecalignError("the speculators format holds EAGLE-3 drafters with feature_source=target only")
        layer = c.llama_config().to_diff_dict()
        layer.pop("transformers_version", None)
        layer.update(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=c.rope_theta)
        target = extra.get("source_store", {}).get("identity", {}).get("target") or {}
        verifier_arch = target.get("architectures", ["VideoLlavaForConditionalGeneration"])
        return {
            "architectures": ["Eagle3Speculator"],
            "speculators_model_type": "eagle3",
            "transformer_layer_config": layer,
            "draft_vocab_size": c.draft_vocab_size,
            "norm_before_residual": c.norm_before_residual,
            "target_hidden_size": None,
            "eagle_aux_hidden_state_layer_ids": list(c.aux_layer_ids),
            "speculators_config": {
                "algorithm": "eagle3",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": c.ttt_steps,
                                      "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                "default_proposal_method": "greedy",
                "verifier": {"name_or_path": extra.get("verifier") or target.get("path"),
                         "architectures": verifier_arch},
            },
            "source_store": extra.get("source_store"),   # the store it was trained on (specalign.identity)
            # what this drafter reads besides the aux hidden states (speculators has no key for it: vLLM does not
            # feed it, so a drafter with prompt_context is exported for our engine and for inspection)
            "specalign_prompt_context": {
                "enabled": c.prompt_context,
                **({"prompt_row": "aux hidden states at the prompt position before the last (P - 2), paired "
                                  "with the last prompt token: the first round proposes r_0",
                    "video_rows": c.video_rows, "video_token_id": c.video_token_id,
                    "video_pool": "mean of the aux hidden states over video_rows equal contiguous runs of the "
                                  "video positions (one per frame), fed through fc beside the learned "
                                  "context_embed [video_rows, hidden] as keys every query attends to",
                    "context_features": c.context_features} if c.prompt_context else {}),
            },
        }

    def from_speculators(self, config: dict, state: dict) -> Eagle3Drafter:
        layer = config["transformer_layer_config"]
        theta = layer.get("rope_theta", (layer.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        ids = list(config["eagle_aux_hidden_state_layer_ids"])
        ctx = config.get("specalign_prompt_context") or {}
        names = [feature_name("target", i) for i in ids]
        return Eagle3Drafter(Eagle3Config(
            hidden_size=layer["hidden_size"], intermediate_size=layer["intermediate_size"],
            num_attention_heads=layer["num_attention_heads"],
            num_key_value_heads=layer.get("num_key_value_heads", layer["num_attention_heads"]),
            rms_norm_eps=layer["rms_norm_eps"], rope_theta=theta,
            max_position_embeddings=layer["max_position_embeddings"], vocab_size=layer["vocab_size"],
            draft_vocab_size=config["draft_vocab_size"], feature_source="target",
            feature_names=names, fc_in_features=state["fc.weight"].shape[1],
            aux_layer_ids=ids, norm_before_residual=config["norm_before_residual"],
            ttt_steps=config["speculators_config"]["proposal_methods"][0]["speculative_tokens"],
            prompt_context=bool(ctx.get("enabled")), context_features=ctx.get("context_features", []),
            video_rows=int(ctx.get("video_rows", 0)), video_token_id=ctx.get("video_token_id")))

    def row_context(self, model, store, row, **options):
        """What `propose` reads for one store row: the fused feature rows of the response (`fuse_features`),
        as a `PromptRows` with the row's prompt context when the drafter reads one."""
        c = model.config
        rows = fuse_features(lambda n: store.hidden(row, n), c.feature_names)
        if not c.prompt_context:
            return rows
        ctx = context_inputs(store, row, c.feature_names, c.context_features)
        return PromptRows(rows, ctx["prompt"], int(ctx["prompt_token"]), ctx["video"])
