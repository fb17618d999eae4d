"""Drafter types: the one interface every drafter implements, and the registry that train, export,
evaluate (offline and online) and the pipeline find them in.

A drafter type is one module and one config, registered once:

    adapters/<kind>.py         its torch model and config, its Lightning module (how it trains, on which
                               batches), what it reads online, and `@register class <Kind>Type(DrafterType)`
    conf/adapter/<kind>.yaml   `kind: <kind>`, the keys its `configure` reads, and lr / warmup_steps /
                               batch_size / max_len (the optimizer, scheduler and loaders read those)

A kind not registered yet is looked up as the module `specalign.adapters.<kind>`, which registers it on
import; a type defined elsewhere (a test, a plugin) calls `register` before it is used.

Every drafter model (an nn.Module with `kind`, `config` and `num_params()`) has, besides its own training
forward (read by its Lightning module's `losses`):

- `propose(context, prefix, gamma, pick=greedy) -> (tokens, q)`: one round of one sequence. Each token is
  chosen by `pick` from the drafter's next-token logits over the target vocabulary: `greedy` takes the
  argmax, a sampling pick (specdec/online_drafters.py) draws and returns the distribution it drew from;
  q [k, V] stacks those (None when greedy). `context` is what the type reads besides the prefix (its
  `OnlineInputs.context`: EventGPT's response, target features, ...). The proposal is a chain.
- `tree_logprobs(context, prefix, paths) -> [len(paths), V]`: the draft tree's hook (specdec/tree.py): for
  several branch paths at once (token lists of one length), the next-token log-probabilities after
  prefix + path over the target vocabulary; a row of -inf proposes nothing there.
- `chain_runs(batch, depth) -> ChainRuns`: for greedy chains, at every position of every row of a batch
  at once (the prefix at each position is the target's own response), how many of the proposed tokens
  the target accepts. Rounds are then walked from these runs (specdec/metrics.py: `rounds_from_runs`),
  which are exactly the rounds `simulate_greedy` gets from `propose` round by round, in a few batched
  forwards.
- `next_logprobs(batch) -> [B, T, V]`: teacher-forced log-probabilities, row j the distribution of the
  token after r[:j] (the expected acceptance of speculative sampling reads it).

A batch is the type's training batch format (its DataModule's collate), built for evaluation by
`DrafterType.batch` from store rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from specalign.errors import SpecalignError
from specalign.registry import Registry

# A pick rule: next-token logits [V] (target vocabulary) -> (token, the distribution it was drawn from or None)
Pick = Callable[[Tensor], tuple[int, Tensor | None]]

# what the engine hands an online drafter's `begin` as its per-sequence request (specdec/online_eval.py)
DRAFT_RESPONSE = "draft_response"   # EventGPT's free-running greedy response (generated before the run)
DRAFT_PREFILL = "draft_prefill"     # EventGPT's prompt, to prefill its own cache


def greedy(logits: Tensor) -> tuple[int, None]:
    """The greedy pick rule: the argmax (the smallest id among ties)."""
    return int(logits.argmax()), None


def stacked(qs: list[Tensor | None]) -> Tensor | None:
    """The q rows of one proposal -> [k, V], or None when the pick rule gave none (greedy)."""
    return None if not qs or qs[0] is None else torch.stack(qs)


@dataclass
class ChainRuns:
    """Greedy chains at every position of a batch:
    run [B, T]: run[b, p], how many of the greedy tokens the drafter proposes from the prefix r[:p] of
                row b equal r[p], r[p+1], ... (counted up to `depth` at least);
    cap [B, T]: how many tokens it proposes there at most (0: none; EAGLE-3 without the prompt context has no
                token to embed at p = 0);
    length [B]: each row's response length in the batch.
    A position beyond T is one the drafter proposes nothing at (a TokenAdapter past its max_len)."""

    run: Tensor
    cap: Tensor
    length: Tensor

    def row(self, b: int, n: int) -> tuple[list[int], list[int]]:
        """Row b's first n positions (n: its response length in this batch) as lists."""
        return self.run[b, :n].tolist(), self.cap[b, :n].tolist()


class Variant(NamedTuple):
    """The same weights as another drafter: options of `DrafterType.batch` / `online_inputs`, and what a
    report says about it."""

    options: dict
    note: str


class OnlineInputs:
    """What an online drafter reads besides the accepted prefix, gathered along one sequence (the engine's
    `begin` / `observe` calls, specdec/online.py). This base reads nothing: a prefix-only drafter."""

    request: str | None = None              # the engine's per-sequence request: DRAFT_RESPONSE, DRAFT_PREFILL
    hidden_layers: Sequence[int] = ()       # target hidden states (hidden_states indices) it reads
    schedule: str | None = None             # when EventGPT's response is read: specdec/schedule.py (None: never)

    def begin(self, context) -> None:
        """Once per sequence, after the target prefill (`specdec.online.DraftContext`)."""

    def context(self, accepted: list[int]) -> Any:
        """The `context` argument of `propose` at this accepted prefix."""
        return None

    def observe(self, accepted_tokens: list[int], hidden: dict[int, Tensor] | None) -> None:
        """After each round: the tokens it appended and the target's hidden states of the tokens that
        entered its cache."""


class DrafterType:
    """One kind of drafter. Subclasses set the class attributes and override what differs from the
    defaults (a prefix-only drafter trained on token pairs needs only `configure` besides them)."""

    kind: ClassVar[str]
    model_class: ClassVar[type[nn.Module]]     # model_class(config)
    config_class: ClassVar[type]               # a dataclass with to_dict() / from_dict()
    module_class: ClassVar[type]               # its train.modules.DrafterModule (how it trains)

    # ---- model and training
    def build(self, config: dict) -> nn.Module:
        return self.model_class(self.config_class.from_dict(config))

    def configure(self, adapter: dict, store, split: str):
        """The model config from the `adapter` config (conf/adapter/<kind>.yaml) and the store (a
        data.store.FeatureStore) whose `split` rows it trains on."""
        return self.config_class.from_dict({**adapter, "vocab_size": store.manifest["target"]["vocab_size"]})

    def data_module(self, store: str, config, **loader):
        """Its Lightning DataModule over the store (loader: batch_size, num_workers, splits, seed, max_len)."""
        from specalign.train.datamodule import TokenPairDataModule

        return TokenPairDataModule(store, **loader)

    # ---- evaluation
    def batch(self, model: nn.Module, store, rows: list, **options) -> dict:
        """Store rows -> one batch in the training format (CPU). Options: those of `variants`."""
        from specalign.train.datamodule import collate_tokens

        limit = getattr(model.config, "max_len", None)
        return collate_tokens([{"draft": torch.tensor(r.draft_tokens[:limit], dtype=torch.long),
                                "target": torch.tensor(r.target_tokens[:limit], dtype=torch.long)} for r in rows])

    def check_store(self, model: nn.Module, store) -> None:
        """Raise StoreMismatch when the store lacks what the drafter reads."""

    def row_context(self, model: nn.Module, store, row, **options) -> Any:
        """Offline, the `context` of `propose` / `tree_logprobs` for one store row (what `online_inputs`
        gathers online); options: those of `variants`. Draft trees are scored round by round from it."""
        return None

    def variants(self, model: nn.Module) -> dict[str, Variant]:
        """Other drafters the same weights make, by report name (the TokenAdapter without its draft:
        {"no_draft": Variant({"keep_draft": False}, ...)})."""
        return {}

    def notes(self, model: nn.Module, name: str, mode: str) -> list[str]:
        """Lines for a report (mode: offline | online) that shows the drafter as `name`."""
        return []

    def schedule(self, model: nn.Module, **options) -> str | None:
        """The draft schedule the drafter (with the options of a variant) assumes, `sequential` or `concurrent`
        (specdec/schedule.py), or None when it reads no EventGPT response. Under `concurrent` its chains depend
        on gamma (`chain_runs(batch, depth)` holds for gamma = depth only)."""
        return None

    def online_inputs(self, model: nn.Module, draft_model: nn.Module, **options) -> OnlineInputs:
        """A fresh per-sequence reader of its inputs for the online engine (draft_model: EventGPT)."""
        return OnlineInputs()

    def static_proposer(self, model: nn.Module, cuda_graphs: bool, compile: bool):
        """Its greedy rounds on static shapes for the static engine (specdec/fast_drafters.py: `begin(context)`,
        `propose(context, prefix, gamma) -> tokens`), or None (this default): `propose` runs eagerly."""

    # ---- export (adapters/export_format.py)
    def vocab_info(self, model: nn.Module) -> dict:
        return {"vocab_size": model.config.vocab_size}

    def to_speculators(self, model: nn.Module, extra: dict) -> dict:
        """The speculators / vLLM config.json of the model, where the format applies."""
        raise SpecalignError(f"the speculators format holds no {self.kind} drafter")

    def from_speculators(self, config: dict, state: dict) -> nn.Module:
        raise SpecalignError(f"the speculators format holds no {self.kind} drafter")


TYPES: Registry[DrafterType] = Registry("drafter type", "adapter.kind", "specalign.adapters.{}")


def register(cls: type[DrafterType]) -> type[DrafterType]:
    """Class decorator: make `cls.kind` a drafter type."""
    TYPES.add(cls.kind, cls())
    return cls


def drafter_type(kind: str) -> DrafterType:
    """The registered type of `kind` (imports `specalign.adapters.<kind>` the first time)."""
    return TYPES[kind]


def type_of(model: nn.Module) -> DrafterType:
    """The type of a drafter model (its `kind`)."""
    return drafter_type(model.kind)
