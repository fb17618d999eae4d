"""Cross-check of the online engine against transformers' own assisted generation (greedy).

A `Drafter` is plugged into `generate()` as a custom `CandidateGenerator`. transformers 5.x has no
`generate` argument for one, so `candidate_generator_of` shadows the model's `_get_candidate_generator`
factory with an instance attribute for the duration of one call; `prompt_lookup_num_tokens=gamma`
switches `generate` into assisted decoding without an assistant model (the factory it would pick
is the one shadowed).

transformers 5.25 also asks the generator how many tokens it drafts per round (`num_drafting_tokens`,
the recurrent states a cache keeps for rollback); the project pins transformers below 5.26.

transformers reports, per round, `num_matches` after cutting the round at EOS and at max_new_tokens,
i.e. `Round.generated - 1`: equal to `Round.accepted` in every round but possibly the last.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from specalign.specdec.online import DraftContext, Drafter
from transformers.generation.candidate_generator import CandidateGenerator


class DrafterCandidates(CandidateGenerator):
    """Candidates from a Drafter, at most min(gamma, tokens left) per round, like the online engine."""

    def __init__(self, drafter: Drafter, prompt_len: int, gamma: int, max_new_tokens: int):
        self.drafter, self.prompt_len, self.gamma, self.max_new_tokens = drafter, prompt_len, gamma, max_new_tokens
        self.seen = prompt_len           # sequence length the drafter has been told about
        self.accepts: list[int] = []     # num_matches per round

    @property
    def num_drafting_tokens(self) -> int:
        """Most tokens drafted per round (transformers sizes the cache's rollback record by it)."""
        return self.gamma

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, None]:
        accepted = input_ids[0, self.prompt_len:].tolist()                        # input_ids [1, L]
        k = min(self.gamma, self.max_new_tokens - len(accepted))
        tokens = list(self.drafter.propose(accepted, k)[0])[:k]
        proposal = torch.tensor([tokens], dtype=input_ids.dtype, device=input_ids.device).view(1, -1)
        return torch.cat([input_ids, proposal], dim=1), None                      # [1, L + k]

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        self.accepts.append(int(num_matches))
        self.drafter.observe(input_ids[0, self.seen:].tolist(), None)
        self.seen = input_ids.shape[1]


@contextmanager
def candidate_generator_of(model, generator: CandidateGenerator) -> Iterator[None]:
    """Make `model.generate` use `generator` in assisted decoding."""
    model._get_candidate_generator = lambda **kwargs: generator
    try:
        yield
    finally:
        del model._get_candidate_generator


@dataclass
class AssistedResult:
    tokens: list[int]
    accepts: list[int]


@torch.no_grad()
def assisted_generate(target, drafter: Drafter, inputs: dict, gamma: int, max_new_tokens: int,
                      eos_token_id: int | Sequence[int] | None = None, request=None) -> AssistedResult:
    """Greedy assisted generation of one sequence. `inputs`: the target's generate inputs (input_ids
    [1, P], attention_mask, pixel values, ...); `eos_token_id` None keeps the model's default."""
    prompt_len = inputs["input_ids"].shape[1]
    drafter.begin(DraftContext(inputs, request, prompt_len, None))
    candidates = DrafterCandidates(drafter, prompt_len, gamma, max_new_tokens)
    eos = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
    with candidate_generator_of(target, candidates):
        out = target.generate(**inputs, **eos, do_sample=False, max_new_tokens=max_new_tokens,
                              prompt_lookup_num_tokens=gamma)
    return AssistedResult(out[0, prompt_len:].tolist(), candidates.accepts)

