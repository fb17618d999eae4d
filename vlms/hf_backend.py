"""What both VLM backends share: loading options, CLIP preprocessing, left padding, batched greedy
decoding and the teacher-forced capture of feature rows (vlms/base.py is the interface).

Beyond the interface, two ways to get the feature rows without a second pass over a prompt (used by the
batched extraction, train/extract.py): `generate(..., capture_layers=...)` keeps the rows of its own
responses as it decodes, and `generate_and_teacher_force` prefills the prompt once, decodes on that KV
cache, then teacher-forces other responses on top of the cropped cache. Both give `teacher_forced`'s rows
up to floating-point noise (tests/test_vlm_backends.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from specalign.vlms.alignment import gather_rows, teacher_forced_inputs
from specalign.vlms.base import Batch, eagle3_layers
from torch import nn

from specalign.errors import DataError

QUANTS = ("bf16", "fp32", "nf4")
KV_CACHES = ("static", "dynamic", "offloaded")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------- loading

def check_model_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise DataError(path, f"no config.json: not a {what} checkpoint directory",
                        hint="point the model path at a local directory holding config.json and *.safetensors")
    return path


def load_pretrained(cls, path: Path, quant: str, keep_dense: Sequence[str], device: str | torch.device,
                    compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """`cls.from_pretrained(path)` in "bf16", "fp32" or "nf4", on `device`, in eval mode.

    nf4: 4-bit NormalFloat weights (double quantised) computing in `compute_dtype`, through transformers'
    bitsandbytes integration (which needs `accelerate`); the modules named in `keep_dense` (full module
    paths) stay unquantised in `compute_dtype`. Dense weights are read on the CPU, then moved."""
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    if quant != "nf4":
        dtype = torch.float32 if quant == "fp32" else torch.bfloat16
        return cls.from_pretrained(path, dtype=dtype).to(device).eval()
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(keep_dense))
    return cls.from_pretrained(path, dtype=compute_dtype, quantization_config=bnb,
                               device_map={"": str(device)}).eval()


def dense_modules(dense: Sequence[str], towers: Sequence[str], quantize_towers: bool,
                  quantize_head: bool) -> list[str]:
    """The module paths an nf4 load keeps unquantised: `dense` (LM head, projectors) without the LM head
    when `quantize_head`, plus the vision `towers` unless `quantize_towers`."""
    keep = [m for m in dense if not (quantize_head and m == "lm_head")]
    return keep + ([] if quantize_towers else list(towers))


def config_hash(config) -> str:
    """Hash of the architecture config, independent of dtype, quantisation and where it was loaded from."""
    volatile = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config",
                "architectures", "_attn_implementation_autoset"}

    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in volatile}

    text = json.dumps(strip(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ media

def clip_preprocess(frames: Sequence[np.ndarray] | np.ndarray, size: int) -> torch.Tensor:
    """[n, H, W, 3] uint8 RGB frames -> [n, 3, size, size] CLIP input, with CLIPImageProcessor's steps:
    bicubic resize of the shortest edge to `size` (rounded to uint8 levels), centre crop, scale to [0, 1],
    normalise with the CLIP mean/std. Done in torch without torchvision; torch's antialiased bicubic
    kernel differs slightly from PIL's, so pixel values match the HF processor closely, not bit for bit."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    out = []
    for frame in frames:
        image = torch.from_numpy(np.array(frame)).permute(2, 0, 1).float()[None]  # [1, 3, H, W]
        h, w = image.shape[-2:]
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        new_hw = (size, new_long) if h <= w else (new_long, size)
        image = F.interpolate(image, size=new_hw, mode="bicubic", antialias=True, align_corners=False)
        image = image.round().clamp(0, 255)[0]
        top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
        image = image[:, top:top + size, left:left + size]
        out.append((image / 255.0 - mean) / std)
    return torch.stack(out)


# --------------------------------------------------------------------------------------- batching

def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> input_ids [B, L], attention_mask [B, L], padded on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids[b, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[b, width - len(s):] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only (what `generate` does): [B, L], 0 on padding."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def cut_after_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


@contextmanager
def hook_layers(decoder: nn.Module, layers: Sequence[int], keep: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While active, call `keep(name, hidden)` on every forward with the input of `decoder.layers[i]`
    (name "h{i}", transformers' hidden_states[i]) and the output of `decoder.norm` (name "final")."""

    def keep_input(name):
        def hook(module, args, kwargs):
            keep(name, args[0] if args else kwargs["hidden_states"])
        return hook

    def keep_output(module, args, output):
        keep("final", output)

    handles = [decoder.layers[i].register_forward_pre_hook(keep_input(f"h{i}"), with_kwargs=True)
               for i in dict.fromkeys(layers)]
    handles.append(decoder.norm.register_forward_hook(keep_output))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_rows(decoder: nn.Module, layers: Sequence[int],
                 gather: Callable[[torch.Tensor], list[torch.Tensor]]) -> Iterator[dict]:
    """While active, keep `gather(hidden)` of the inputs of `decoder.layers[i]` (as "h{i}") and of the
    output of `decoder.norm` (as "final"); nothing else of the pass is kept."""
    captured: dict[str, list[torch.Tensor]] = {}
    with hook_layers(decoder, layers, lambda name, hidden: captured.__setitem__(name, gather(hidden))):
        yield captured


@contextmanager
def capture_last_position(decoder: nn.Module, layers: Sequence[int]) -> Iterator[dict]:
    """While active, every forward appends the last sequence position of the hooked states ([B, H], a copy:
    no view keeps a prefill's [B, L, H] activations alive) to the list of its name. At a prefill that is the
    last prompt position (left padding), at a KV-cache decode step the single new position."""
    captured: dict[str, list[torch.Tensor]] = {}
    with hook_layers(decoder, layers, lambda name, hidden: captured.setdefault(name, []).append(
            hidden[:, -1].clone())):
        yield captured


def rows_of_steps(steps: dict[str, list[torch.Tensor]], n_rows: Sequence[int]) -> dict[str, list[torch.Tensor]]:
    """{name: S tensors [B, H], one per forward} -> {name: per request b its first n_rows[b] rows [n_b, H]},
    on the CPU (the format of `HFBackend.teacher_forced`)."""
    out = {}
    for name, per_step in steps.items():
        stacked = torch.stack(per_step, dim=1).cpu()                                # [B, S, H]
        out[name] = [stacked[b, :n].clone() for b, n in enumerate(n_rows)]
    return out


class HFBackend:
    """A frozen transformers VLM with its tokenizer. Subclasses build prompts and media (`prepare`),
    name the decoder holding `.layers` and `.norm`, and the media input of the forward pass."""

    role: str
    name: str

    def __init__(self, model: nn.Module, tokenizer, path: str | Path | None = None, quant: str = "fp32",
                 kv_cache: str = "static"):
        """kv_cache: the KV cache of decoding. "static": allocated once for prompt + new tokens, written in
        place (a growing cache copies itself at every step); "dynamic": grows by concatenation;
        "offloaded": static, each layer's keys and values kept on the CPU and fetched back one layer
        ahead (CUDA only; least GPU memory, slower)."""
        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
        self.model = model.eval()
        self.kv_cache = kv_cache
        self.tokenizer = tokenizer
        self.path = str(path) if path is not None else None
        self.quant = quant
        self.engine = None   # what online decoding runs (a specdec.engine.StaticDecoder); None: the model itself
        self.batch_decoder = None   # the decode steps of batched generation (`use_batch_decoder`); None: plain
        self.text_config = model.config.get_text_config()
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id

    @property
    def decoder(self) -> nn.Module:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def media_dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # ------------------------------------------------------------------------------ description

    def identity(self) -> dict:
        """What the store records of this model (specalign.identity): `weights` fingerprints the checkpoint
        files, or the parameters of a model built in memory."""
        from specalign.identity import weights_fingerprint

        path = str(Path(self.path).resolve()) if self.path else None   # valid from any working directory
        return {"name": self.name, "path": path, "config_hash": config_hash(self.model.config),
                "weights": weights_fingerprint(self.path or self.model),
                "vocab_size": self.text_config.vocab_size, "hidden_size": self.text_config.hidden_size,
                "num_layers": self.text_config.num_hidden_layers, "quant": self.quant}

    def capture_layers(self) -> list[int]:
        return eagle3_layers(self.text_config.num_hidden_layers)

    def lm_head_weight(self) -> torch.Tensor:
        """[V, H]: the weight the LM head multiplies by. A 4-bit head (bitsandbytes, whose kernels may
        repack it) is read off the head itself: its outputs for the H unit vectors, in the compute dtype."""
        head = self.model.get_output_embeddings()
        if getattr(head.weight, "quant_state", None) is None:
            return head.weight.detach()
        eye = torch.eye(self.text_config.hidden_size, device=self.device, dtype=self.media_dtype)
        with torch.no_grad():
            return head(eye[:, None])[:, 0].T.contiguous()                         # [H, V] -> [V, H]

    def embed_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight.detach()

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # ------------------------------------------------------------------------------ batches

    def clip_frames(self, requests, read: Callable, media_map=map) -> dict[str, torch.Tensor]:
        """Each distinct clip of `requests` read (`read(sample)` -> [n, H, W, 3] frames) and CLIP-preprocessed at
        the vision tower's size, the clips mapped by `media_map` -> {sample id: [n, 3, S, S]}."""
        size = self.model.config.vision_config.image_size
        clips = {r.sample.id: r.sample for r in requests}
        return dict(zip(clips, media_map(lambda sample: clip_preprocess(read(sample), size), clips.values())))

    def make_batch(self, requests, prompts: list[list[int]], media: dict[str, torch.Tensor],
                   on_host: bool = False) -> Batch:
        """Left-padded prompts plus media tensors, on the model's device (on_host: in host memory, pinned when
        the model is on CUDA, for a later `Batch.to`)."""
        input_ids, attention_mask = left_pad(prompts, self.pad_id)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        inputs |= {k: v.to(self.media_dtype) for k, v in media.items()}
        if not on_host:
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
        elif torch.device(self.device).type == "cuda":
            inputs = {k: v.pin_memory() for k, v in inputs.items()}
        return Batch(requests=list(requests), inputs=inputs, prompt_lens=[len(p) for p in prompts])

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int, ignore_eos: bool = False,
                 capture_layers: Sequence[int] | None = None
                 ) -> list[list[int]] | tuple[list[list[int]], dict[str, list[torch.Tensor]]]:
        """Batched greedy decoding with the KV cache. Rows are cut after their first EOS (kept);
        with `ignore_eos` every row runs `max_new_tokens` steps and nothing is cut.

        With `capture_layers`, returns (responses, feats): the feature rows of the responses captured during
        decoding, in the format of `teacher_forced(batch, responses, capture_layers)` (the same numbers up to
        floating-point noise, without a second pass over the prompt). Row 0 is the last prompt position of
        the prefill, row j the input position of decode step j (holding r_{j-1}; its logits chose r_j), for
        j < len(responses[b]); so argmax(final row j @ LM head) == r_j by construction."""
        if capture_layers is None:
            return self._greedy(batch, max_new_tokens, ignore_eos)[0]
        self._check_layers(capture_layers)
        if max_new_tokens <= 0:  # no forward at all: no rows
            empty = torch.empty(0, self.text_config.hidden_size, dtype=self.media_dtype)
            names = [f"h{i}" for i in sorted(set(capture_layers))] + ["final"]  # the order the hooks fire in
            return [[] for _ in batch.requests], {name: [empty] * len(batch.requests) for name in names}
        with capture_last_position(self.decoder, capture_layers) as steps:
            out, mask, positions = self._prefill(batch, max_new_tokens)           # row 0
        responses, _, more = self._decode(out, mask, positions, max_new_tokens, ignore_eos, capture_layers)
        for name, rows in more.items():                                           # rows 1.. of the decode steps
            steps[name] += rows
        return responses, rows_of_steps(steps, [len(r) for r in responses])

    @torch.no_grad()
    def generate_and_teacher_force(self, batch: Batch, max_new_tokens: int, responses: list[list[int]],
                                   layers: Sequence[int], ignore_eos: bool = False
                                   ) -> tuple[list[list[int]], dict[str, list[torch.Tensor]]]:
        """(`generate(batch, max_new_tokens, ignore_eos)`, `teacher_forced(batch, responses, layers)`) with the
        prompt computed once (same numbers up to floating-point noise). `responses` are other tokens than
        this model's own (the draft forced on the target's responses).

        The prompt prefill runs once with the KV cache; its last position is feature row 0 of every
        response. Greedy decoding continues on that cache; the cache is then cropped back to the (left
        padded) prompt and responses[b][:-1] are fed on top of it in one forward, right padded to the
        longest, at positions P_b, P_b + 1, ... (positions count real tokens, as `positions_from_mask`):
        they give rows 1..n_b-1 (`vlms.alignment`: row i is at position P_b - 1 + i)."""
        self._check_layers(layers)
        with capture_last_position(self.decoder, layers) as first:
            out, mask, positions = self._prefill(batch, max(max_new_tokens, max(map(len, responses), default=0)))
        own, cache, _ = self._decode(out, mask, positions, max_new_tokens, ignore_eos)
        n_rows = [len(r) for r in responses]
        feats = rows_of_steps(first, [min(n, 1) for n in n_rows])                  # row 0 (none if n_b = 0)
        tails = [list(r[:-1]) for r in responses]
        width = max((len(t) for t in tails), default=0)
        if width == 0:
            return own, feats
        cache.crop(mask.shape[1] - int(cache.get_seq_length()))                   # back to the prompt
        ids = torch.full((len(tails), width), self.pad_id, dtype=torch.long)
        tail_mask = torch.zeros((len(tails), width), dtype=torch.long)
        for b, t in enumerate(tails):
            ids[b, :len(t)] = torch.tensor(t, dtype=torch.long)
            tail_mask[b, :len(t)] = 1
        prompt_lens = torch.tensor(batch.prompt_lens, dtype=torch.long)
        tail_positions = prompt_lens[:, None] + torch.arange(width)                # [B, width]
        mask = torch.cat([mask, tail_mask.to(mask.device)], dim=1)

        def gather(hidden):
            return [hidden[b, :len(t)] for b, t in enumerate(tails)]

        with capture_rows(self.decoder, layers, gather) as rest:
            self.model.model(input_ids=ids.to(self.device), attention_mask=mask,
                             position_ids=tail_positions.to(self.device), cache=cache, use_cache=True)
        for name in feats:
            feats[name] = [torch.cat([row0, more.cpu()]) for row0, more in zip(feats[name], rest[name])]
        return own, feats

    # ------------------------------------------------------------------------------ internals

    def _check_layers(self, layers: Sequence[int]) -> None:
        bad = [i for i in layers if not 0 <= i < self.text_config.num_hidden_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for {self.text_config.num_hidden_layers} decoder layers")

    def use_batch_decoder(self, cuda_graphs: bool = False, compile: bool = False) -> None:
        """Run batched generation's decode steps through `vlms.batch_decode.BatchDecoder` (a static cache,
        CUDA graphs per batch size, fused ops) when the KV cache is "static"; the same tokens and rows."""
        from specalign.vlms.batch_decode import BatchDecoder

        self.batch_decoder = BatchDecoder(self.model, self.decoder, cuda_graphs, compile) \
            if self.kv_cache == "static" else None

    def _new_cache(self, max_len: int, batch: int = 1):
        """An empty KV cache (`self.kv_cache`) for `batch` sequences of up to `max_len` (padded) positions."""
        from transformers import DynamicCache, StaticCache

        if self.batch_decoder is not None:
            return self.batch_decoder.new_cache(batch, max_len)
        if self.kv_cache == "dynamic":
            return DynamicCache(config=self.model.config)
        offload = self.kv_cache == "offloaded"
        if offload and self.device.type != "cuda":
            raise ValueError(f'kv_cache="offloaded" keeps the cache in host memory beside a CUDA device; this '
                             f'model is on {self.device.type}: use "static" or "dynamic"')
        return StaticCache(config=self.model.config, max_cache_len=max_len, offloading=offload)

    def _prefill(self, batch: Batch, max_new_tokens: int):
        """The prompt forward with a KV cache for `max_new_tokens` more positions: (output, attention mask,
        position ids)."""
        inputs = dict(batch.inputs)
        mask = inputs.pop("attention_mask")
        positions = positions_from_mask(mask)
        cache = self._new_cache(mask.shape[1] + max(max_new_tokens, 1), mask.shape[0])
        out = self.model(**inputs, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out, mask, positions

    def _decode(self, out, mask: torch.Tensor, positions: torch.Tensor, max_new_tokens: int, ignore_eos: bool,
                layers: Sequence[int] | None = None):
        """Greedy steps after `_prefill`: (responses, the KV cache, rows). Forward k (k = 0 the prefill)
        chooses token k; the last chosen token is never fed. With `layers`, rows {name: per decode step the
        [B, H] rows of its input position} (as `capture_last_position`), else {}."""
        if max_new_tokens <= 0:
            return [[] for _ in range(mask.shape[0])], out.cache, {}
        if self.batch_decoder is not None:
            tokens, rows = self.batch_decoder.decode(out.logits[:, -1], out.cache, mask, positions, max_new_tokens,
                                                     None if ignore_eos else self.eos_id, layers)
        else:
            tokens, rows = self._plain_decode(out, mask, positions, max_new_tokens, ignore_eos, layers)
        return (tokens if ignore_eos else [cut_after_eos(t, self.eos_id) for t in tokens]), out.cache, rows

    def _plain_decode(self, out, mask: torch.Tensor, positions: torch.Tensor, max_new_tokens: int,
                      ignore_eos: bool, layers: Sequence[int] | None):
        """The decode loop of `_decode` through the model's own forward (any KV cache): (tokens, rows)."""
        steps, finished = [], torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        keep = capture_last_position(self.decoder, layers) if layers is not None else nullcontext({})
        with keep as rows:
            for step in range(max_new_tokens):
                token = out.logits[:, -1].argmax(-1)                               # [B]
                steps.append(token)
                finished |= token == self.eos_id
                if step + 1 == max_new_tokens or (finished.all() and not ignore_eos):
                    break
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                positions = positions[:, -1:] + 1
                out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                                 cache=out.cache, use_cache=True, logits_to_keep=1)
        return torch.stack(steps, dim=1).tolist(), rows

    def _greedy(self, batch: Batch, max_new_tokens: int, ignore_eos: bool):
        if max_new_tokens <= 0:
            return [[] for _ in batch.requests], None
        out, mask, positions = self._prefill(batch, max_new_tokens)
        return self._decode(out, mask, positions, max_new_tokens, ignore_eos)[:2]

    @torch.no_grad()
    def teacher_forced(self, batch: Batch, responses: list[list[int]], layers: list[int]
                       ) -> dict[str, list[torch.Tensor]]:
        """One forward of prompt + responses[b][:-1] per batch (left padded, no LM head). Returns
        {"h{i}": [...], "final": [...]}, per request a [len(responses[b]), H] tensor on the CPU whose
        row i is at `vlms.alignment.feature_positions` (it predicts responses[b][i])."""
        self._check_layers(layers)
        ids = batch.inputs["input_ids"]
        prompts = [ids[b, ids.shape[1] - n:].tolist() for b, n in enumerate(batch.prompt_lens)]
        seqs = [teacher_forced_inputs(p, r) for p, r in zip(prompts, responses)]
        input_ids, mask = left_pad(seqs, self.pad_id)
        pads = [input_ids.shape[1] - len(s) for s in seqs]
        n_rows = [len(r) for r in responses]
        media = {k: v for k, v in batch.inputs.items() if k not in ("input_ids", "attention_mask")}
        with capture_rows(self.decoder, layers, lambda h: gather_rows(h, batch.prompt_lens, n_rows, pads)) as rows:
            self.model.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                             position_ids=positions_from_mask(mask).to(self.device), use_cache=False, **media)
        return {name: [t.cpu() for t in per_request] for name, per_request in rows.items()}
