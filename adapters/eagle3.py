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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

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


class Eagle3Drafter(nn.Module):
    """State-dict names follow the speculators layout: fc, layers.0.*, norm, lm_head,
    embed_tokens, d2t, t2d."""

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

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def step(self, ids, hidden, positions, past, mask):
        """One pass of the layer. ids [B, T] target ids, hidden [B, T, H], positions [1, T].
        Appends this pass's keys/values to `past`. -> (hidden out [B, T, H], logits [B, T, N])."""
        cos, sin = self.rotary_emb(hidden, positions)
        h, kv = self.layers[0](self.embed_tokens(ids), hidden, cos, sin, past, mask)
        past.append(kv)
        return h, self.lm_head(self.norm(h))

    def ttt(self, feats: torch.Tensor, tokens: torch.Tensor, steps: int | None = None) -> list[torch.Tensor]:
        """Training-time test. feats [B, T, fc_in] (row i), tokens [B, T] (r_i), right padded.
        Returns per step k the logits [B, T, N] of every chain i, predicting r_{i+k+1}."""
        steps = self.config.ttt_steps if steps is None else steps
        T = tokens.shape[1]
        dev = tokens.device
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        diag = torch.eye(T, dtype=torch.bool, device=dev)
        pos = torch.arange(T, device=dev)[None]
        hidden = self.fc(feats.to(self.fc.weight.dtype))
        past, out = [], []
        for k in range(steps):
            ids = F.pad(tokens[:, k:], (0, k))                          # chain i reads r_{i+k}
            mask = torch.cat([causal] + [diag] * k, 1)                  # [T, (k+1) T]
            hidden, logits = self.step(ids, hidden, pos + k, past, mask)
            out.append(logits)
        return out

    @torch.no_grad()
    def logits(self, features: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
        """Teacher-forced step-0 distributions of one response, row j for r_j: [n, V_t]
        log-probabilities over the target vocabulary, -inf outside the draft vocabulary.
        Row 0 is -inf everywhere: r_0 is the target's own first token (see `propose`)."""
        n, c = len(tokens), self.config
        out = torch.full((n, c.vocab_size), float("-inf"), device=self.fc.weight.device)
        if n > 1:
            ids = torch.as_tensor(list(tokens[: n - 1]), dtype=torch.long, device=out.device)[None]
            lp = self.ttt(features[None, : n - 1].to(out.device), ids, 1)[0][0].float().log_softmax(-1)
            out[1:, self.to_target(torch.arange(c.draft_vocab_size, device=out.device))] = lp  # chain j-1
        return out

    @torch.no_grad()
    def propose(self, features: torch.Tensor, tokens: Sequence[int], gamma: int) -> list[int]:
        """Greedy drafting inside one round from the accepted prefix r_0..r_{p-1} (p = len(tokens)).

        features: the fused rows of this response (`fuse_features`), at least p of them; only
        rows 0..p-1 (known once r_{p-1} is accepted) are read. Returns gamma target ids for
        r_p, r_{p+1}, ... With p = 0 there is no accepted token to embed: returns [] (the
        round then yields the target's own first token, as EAGLE's prefill does)."""
        p = len(tokens)
        if p == 0 or gamma <= 0:
            return []
        dev = self.fc.weight.device
        feats = features[:p].to(dev, self.fc.weight.dtype)[None]          # [1, p, fc_in]
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=dev)[None]
        causal = torch.ones(p, p, dtype=torch.bool, device=dev).tril()
        past, out = [], []
        hidden, logits = self.step(ids, self.fc(feats), torch.arange(p, device=dev)[None], past, causal)
        hidden, logits = hidden[:, -1:], logits[:, -1:]                     # chain p-1
        for k in range(1, gamma + 1):
            tok = self.to_target(logits.argmax(-1))                           # [1, 1]
            out.append(int(tok))
            if k < gamma:
                hidden, logits = self.step(tok, hidden, torch.tensor([[p - 1 + k]], device=dev), past, None)
        return out

    def num_params(self) -> int:
        """Trainable parameters (the frozen target embeddings excluded)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
