"""Batched greedy decode steps on a static KV cache, replayed as CUDA graphs: the fast path of extraction.

`BatchDecoder` runs the decode steps of `HFBackend.generate` and `generate_and_teacher_force` after their
prompt prefill (train/extract.py). Every step is one forward of the B newest tokens at the cache's length,
which transformers' `StaticCache` keeps on the device: the step computes its positions and its attention
mask from that length inside, so it reads nothing back from the host, and the same step serves every
position of a batch. The greedy token is picked outside the step (an argmax over its logits) and written
into the step's input buffer; the feature rows of the step (the inputs of the captured layers and the
final norm's output at the new position) are copied out, as `capture_last_position` keeps them.

With `cuda_graphs`, the step of a batch size is captured once (`specdec.engine.fastest_graph`: checked
against the eager step, each attention kernel tried, the fastest kept; a capture that fails or disagrees
runs eagerly with a warning) and replayed: one launch instead of the ~3,600 kernels of a 7B forward. A graph
points at its KV cache's tensors, so the decoder keeps one cache per batch size and capacity (rounded up to
`CACHE_ROUNDING` positions) and lends it to every batch of that size: a prefill starts it from length 0, and
the keys a previous batch left past the cached length are masked (a query attends to key positions <= its
own) until they are overwritten. With `compile`, transformers' RMSNorm and rotary embedding are fused by
torch.compile (`specdec.engine.compile_fused_ops`).

Without graphs (the CPU) the cache is a fresh one of the prefill's exact size, as on the plain path, and the
outputs are bit-identical to it (tests/test_batch_decode.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from specalign.specdec.engine import (
    CACHE_ROUNDING,
    Graph,
    check_graphs_device,
    compile_fused_ops,
    fastest_graph,
)
from torch import Tensor, nn


@dataclass
class StepState:
    """The fixed tensors one batch size's step reads (a graph replays against these addresses)."""

    cache: object                     # transformers StaticCache [B, heads, capacity, head_dim] per layer
    ids: Tensor                       # [B] the tokens fed at this step
    base: Tensor                      # [B] position id of row b = base[b] + the cache length
    valid: Tensor                     # [B, capacity] key positions that are not left padding of the prompt
    graphs: dict = field(default_factory=dict)   # layers -> Graph | None


class BatchDecoder:
    """Greedy decode steps of a batch on a static KV cache (see the module docstring).

    model: the causal VLM (its prefill fills the cache); decoder: its LLaMA decoder (`.layers`, `.norm`,
    the module `HFBackend.decoder` names), whose output goes through the model's LM head."""

    def __init__(self, model: nn.Module, decoder: nn.Module, cuda_graphs: bool = False, compile: bool = False):
        self.model, self.decoder, self.head = model, decoder, model.get_output_embeddings()
        self.device = model.get_input_embeddings().weight.device
        check_graphs_device(cuda_graphs, self.device, "decode.cuda_graphs")
        check_graphs_device(compile, self.device, "decode.compile")
        if compile:
            compile_fused_ops(model)
        self.cuda_graphs = cuda_graphs
        self.state: StepState | None = None      # the one kept cache (graphs only): the last batch size's
        self.attention: dict[tuple, str] = {}    # (batch, capacity, layers) -> the SDPA kernel of its graph

    def __repr__(self) -> str:
        return f"BatchDecoder({type(self.model).__name__}, cuda_graphs={self.cuda_graphs})"

    # ------------------------------------------------------------------ cache

    def new_cache(self, batch: int, max_len: int):
        """An empty static cache for `batch` sequences of up to `max_len` positions. With graphs the kept one
        when it fits (same batch size, enough positions), else a new one (rounded up) that replaces it."""
        from transformers import StaticCache

        if not self.cuda_graphs:
            return StaticCache(config=self.model.config, max_cache_len=max_len)
        st = self.state
        if st is None or st.ids.shape[0] != batch or st.valid.shape[1] < max_len:
            self.state = st = None                                             # free the old one first
            capacity = -(-max_len // CACHE_ROUNDING) * CACHE_ROUNDING
            cache = StaticCache(config=self.model.config, max_cache_len=capacity)
            zeros = torch.zeros(batch, dtype=torch.long, device=self.device)
            st = self.state = StepState(cache, zeros, zeros.clone(),
                                        torch.ones(batch, capacity, dtype=torch.bool, device=self.device))
        length = int(st.cache.get_seq_length())
        if length:
            st.cache.crop(-length)                                             # back to empty: keys stay, masked
        return st.cache

    def _state(self, cache, mask: Tensor) -> StepState:
        """The step state of this cache: the kept one (graphs), or one made for this batch."""
        if self.state is not None and self.state.cache is cache:
            return self.state
        batch, capacity = mask.shape[0], cache.layers[0].max_cache_len
        zeros = torch.zeros(batch, dtype=torch.long, device=self.device)
        return StepState(cache, zeros, zeros.clone(),
                         torch.ones(batch, capacity, dtype=torch.bool, device=self.device))

    # ------------------------------------------------------------------ decoding

    @torch.inference_mode()
    def decode(self, logits: Tensor, cache, mask: Tensor, positions: Tensor, max_new_tokens: int,
               stop_id: int | None, layers: Sequence[int] | None = None) -> tuple[list[list[int]], dict]:
        """Greedy steps after a prefill of `mask.shape[1]` (left padded) positions into `cache`.

        logits [B, V]: the prefill's last position (it picks token 0); positions [B, L]: the prefill's
        position ids. Forward k (k = 0 the prefill) picks token k; the last token picked is never fed. With
        `stop_id`, the steps end once every row has produced it. -> (tokens per row, uncut; with `layers`
        {name: per step k >= 1 the rows [B, H] of the step that fed token k - 1})."""
        st = self._state(cache, mask)
        prompt = mask.shape[1]
        st.valid[:, :prompt].copy_(mask.bool())
        st.valid[:, prompt:] = True
        st.base.copy_(positions[:, -1] + 1 - prompt)                          # the first step: position P_b
        token = logits.argmax(-1)                                             # [B]
        tokens, rows = [token], {}
        finished = token == stop_id if stop_id is not None else None
        key = None if layers is None else tuple(layers)
        for _ in range(max_new_tokens - 1):
            if finished is not None and bool(finished.all()):
                break
            st.ids.copy_(token)
            logits, step_rows = self._forward(st, key)
            token = logits.argmax(-1)
            tokens.append(token)
            for name, row in step_rows.items():
                rows.setdefault(name, []).append(row.clone())                 # survives the next replay
            if finished is not None:
                finished |= token == stop_id
        return torch.stack(tokens, dim=1).tolist(), rows

    def _forward(self, st: StepState, layers: tuple | None) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.cuda_graphs:
            return self._step(st, layers)
        if layers not in st.graphs:
            batch, capacity = st.valid.shape
            graph, kernel = fastest_graph(lambda backend: self._step_with(backend, st, layers),
                                          f"the decode step of batch {batch}", lambda: st.cache.crop(-1))
            st.graphs[layers] = graph
            if graph is not None:
                self.attention[(batch, capacity, layers)] = kernel
        graph: Graph | None = st.graphs[layers]
        if graph is None:
            return self._step(st, layers)
        return graph()

    def _step(self, st: StepState, layers: tuple | None) -> tuple[Tensor, dict[str, Tensor]]:
        """One token per row at the cache's length (graph-safe: no host read of a device value).
        -> logits [B, V] in the model's dtype, {name: [B, H]} the captured rows."""
        from specalign.vlms.hf_backend import hook_layers

        start = st.cache.get_seq_length()                                     # device scalar
        capacity = st.valid.shape[1]
        keys = torch.arange(capacity, device=self.device)
        mask = st.valid & (keys <= start)                                     # [B, capacity]
        rows: dict[str, Tensor] = {}
        keep = hook_layers(self.decoder, layers, lambda name, h: rows.__setitem__(name, h[:, -1].clone())) \
            if layers is not None else contextlib.nullcontext()
        with keep:
            out = self.decoder(input_ids=st.ids[:, None], attention_mask=mask[:, None, None],
                               position_ids=(st.base + start)[:, None], cache=st.cache, use_cache=True)
        return self.head(out.last_hidden_state[:, -1:])[:, -1], rows

    def _step_with(self, backend, st: StepState, layers: tuple | None):
        from torch.nn.attention import sdpa_kernel

        with contextlib.nullcontext() if backend is None else sdpa_kernel([backend]):
            return self._step(st, layers)
