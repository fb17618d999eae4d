"""Drafters of the online engine that only the tests use."""

from __future__ import annotations

from specalign.specdec.online import DraftContext, ModelDrafter


class TargetAsDrafter(ModelDrafter):
    """The target drafting for itself from its own prompt: greedy proposals are always accepted."""

    def begin(self, context: DraftContext) -> None:
        self._start(context.prefill)
