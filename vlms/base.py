"""The small interface both VLM backends implement (used by extraction and online decoding).

A backend wraps one frozen model with its tokenizer/processor:

    batch = backend.prepare(requests)                    # media + prompts -> padded tensors
    responses = backend.generate(batch, max_new_tokens)  # greedy, batched, left padding
    feats = backend.teacher_forced(batch, responses, layers)  # captured rows at response positions

Feature rows follow vlms/alignment.py: row i of a response predicts its token i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from specalign.data.samples import Request


def eagle3_layers(num_layers: int) -> list[int]:
    """EAGLE-3's captured low/mid/high layers: inputs of decoder layers 2, L/2, L-3
    (transformers hidden_states indices). Tiny models with L < 6 are clamped into range."""
    idx = [2, num_layers // 2, num_layers - 3]
    return [min(max(i, 0), num_layers - 1) for i in idx]


@dataclass
class Batch:
    """Model inputs for a batch of requests; prompts are left padded."""

    requests: list[Request]
    inputs: dict[str, torch.Tensor]   # input_ids, attention_mask, pixel values ...
    prompt_lens: list[int]            # unpadded prompt length of each row (after media expansion)
    extra: dict[str, Any] | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on `device` (a batch prepared on the host: `prepare(on_host=True)`)."""
        inputs = {k: v.to(device, non_blocking=v.is_pinned()) for k, v in self.inputs.items()}
        return Batch(self.requests, inputs, self.prompt_lens, self.extra)


class VLMBackend(Protocol):
    role: str  # "target" or "draft"

    def identity(self) -> dict:
        """{name, path, config_hash, vocab_size, hidden_size, num_layers} for the store manifest."""

    def prompt_template(self) -> str: ...

    def capture_layers(self) -> list[int]: ...

    def prepare(self, requests: list[Request], on_host: bool = False, media_map=map) -> Batch:
        """on_host: tensors stay in (pinned) host memory, for `Batch.to` later (inputs prepared off the main
        thread); media_map: how the per-clip media loads are mapped (a thread pool's `map`)."""

    def generate(self, batch: Batch, max_new_tokens: int, ignore_eos: bool = False) -> list[list[int]]:
        """Greedy responses: generated ids only, no prompt; cut after the first EOS (EOS kept)."""

    def teacher_forced(self, batch: Batch, responses: list[list[int]], layers: list[int]
                       ) -> dict[str, list[torch.Tensor]]:
        """Run prompt + responses[b][:-1] in one pass; return {"h{i}": [...], "final": [...]}, each a
        per-request list of [len(responses[b]), H] tensors at the feature positions only."""

    # Extraction's fast path (vlms/hf_backend.py): the target's rows captured while it generates
    # (`generate(..., capture_layers=layers)` -> (responses, feats)), and the draft's own greedy
    # response plus its teacher-forced rows over given responses on one prompt cache
    # (`generate_and_teacher_force(batch, max_new_tokens, responses, layers)`).

    def lm_head_weight(self) -> torch.Tensor: ...

    def embed_weight(self) -> torch.Tensor: ...
