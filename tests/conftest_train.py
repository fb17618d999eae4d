"""Tiny feature stores and configs shared by the drafter and training tests.

The tiny target "model": its LM head rows are orthonormal, and target.final row i is
4 * lm_head[r_i] (+ noise), so argmax(final_i @ lm_head.T) = r_i exactly as the store
contract says (row i predicts r_i)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from specalign.data.store import StoreWriter

from specalign.paths import CONF_DIR

V, H, H_DRAFT = 24, 32, 16
LAYERS = [1, 2, 3]


def manifest(kind: str = "full") -> dict:
    return {"kind": kind,
            "target": {"name": "tiny-target", "path": "tiny/target", "config_hash": "t", "vocab_size": V,
                       "hidden_size": H, "num_layers": 6},
            "draft": {"name": "tiny-draft", "path": "tiny/draft", "config_hash": "d", "vocab_size": V,
                      "hidden_size": H_DRAFT, "num_layers": 6},
            "layers": {"target": LAYERS, "draft": LAYERS}, "dtype": "bfloat16",
            "prompts": {"target": "T {question}", "draft": "D {question}"},
            "generation": {"max_new_tokens": 12}}


def sequences(n: int, seed: int = 0, min_len: int = 5, max_len: int = 10) -> list[list[int]]:
    """Target responses that all start alike and then differ (so only the draft can tell them
    apart at the start), tokens in 3..V-1."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        out.append([3] + torch.randint(3, V, (L - 1,), generator=g).tolist())
    return out


def noisy_copy(seq: list[int], g: torch.Generator) -> list[int]:
    """A draft response: the target's tokens with some replaced, ending with EOS."""
    return [t if float(torch.rand(1, generator=g)) > 0.3 else int(torch.randint(3, V, (1,), generator=g))
            for t in seq] + [2]


def target_head(seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(H, V, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()                                                   # [V, H], orthonormal rows


VIDEO_ROWS = 2


def context_spec() -> dict:
    return {"features": [f"target.h{i}" for i in LAYERS], "video_rows": VIDEO_ROWS, "video_token_id": 5,
            "pool": "random"}


def make_store(root: Path, n_train: int = 6, n_val: int = 3, kind: str = "full", seed: int = 0,
               oracle: bool = False, context: bool = True) -> Path:
    """A finished tiny store. oracle=True: the high captured target layer of row i holds
    target.final of row i+1, i.e. it already knows the next token (the alignment check). context: each row
    carries a prompt context (store format 2) whose prompt row's high layer holds 4 * lm_head[r_0]."""
    g = torch.Generator().manual_seed(seed + 1)
    seqs = sequences(n_train + n_val, seed)
    rows = [{"sample_id": f"s{i:02d}", "question_id": 0, "question": "q",
             "split": "train" if i < n_train else "val", "target_tokens": s, "draft_tokens": noisy_copy(s, g)}
            for i, s in enumerate(seqs)]
    w = StoreWriter(root, {**manifest(kind), **({"context": context_spec()} if context and kind == "full" else {})})
    if kind == "tokens":
        w.write_shard(rows)
        return w.finalize()
    head = target_head(seed)
    tensors = {}
    for model, width in (("target", H), ("draft", H_DRAFT)):
        for i in LAYERS:
            tensors[f"{model}.h{i}"] = [torch.randn(len(s), width, generator=g) for s in seqs]
        tensors[f"{model}.final"] = [torch.randn(len(s), width, generator=g) for s in seqs]
    tensors["target.final"] = [4 * head[torch.tensor(s)] + 0.05 * torch.randn(len(s), H, generator=g)
                               for s in seqs]
    if oracle:
        finals = tensors["target.final"]
        tensors[f"target.h{LAYERS[-1]}"] = [torch.cat([f[1:], torch.zeros(1, H)]) for f in finals]
    tensors = {k: torch.cat(v).to(torch.bfloat16) for k, v in tensors.items()}
    if context:
        for i in LAYERS:
            tensors[f"prompt.target.h{i}"] = torch.randn(len(seqs), H, generator=g).to(torch.bfloat16)
            tensors[f"video.target.h{i}"] = torch.randn(len(seqs) * VIDEO_ROWS, H, generator=g).to(torch.bfloat16)
        tensors[f"prompt.target.h{LAYERS[-1]}"] = (4 * head[torch.tensor([s[0] for s in seqs])]).to(torch.bfloat16)
        tensors["prompt.token"] = torch.full((len(seqs),), 7, dtype=torch.long)
    w.write_shard(rows, tensors)
    w.save_heads({"target.lm_head": head, "target.embed_tokens": torch.randn(V, H, generator=g),
                  "draft.lm_head": torch.randn(V, H_DRAFT, generator=g)})
    return w.finalize()


TINY_TOKEN_ADAPTER = ["adapter.n_layer=2", "adapter.d_model=32", "adapter.n_head=2", "adapter.d_ff=64",
                      "adapter.max_len=32", "adapter.batch_size=4", "adapter.warmup_steps=2"]
TINY_EAGLE3 = ["adapter=eagle3", "adapter.num_attention_heads=4", "adapter.intermediate_size=64",
               "adapter.draft_vocab_size=16", "adapter.ttt_steps=3", "adapter.batch_size=4",
               "adapter.warmup_steps=2", "adapter.max_len=32"]
FAST = ["trainer.max_steps=6", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "val.max_rows=3", "val.gamma=3"]


def train_config(store: Path, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"store={store}", f"out={out}", *overrides])
