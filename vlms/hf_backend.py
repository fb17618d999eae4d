"""What both VLM backends share: loading options, CLIP preprocessing, left padding, batched greedy
decoding and the teacher-forced capture of feature rows (vlms/base.py is the interface)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from specalign.errors import DataError
from vlms.alignment import gather_rows, teacher_forced_inputs
from vlms.base import Batch, eagle3_layers

QUANTS = ("bf16", "fp32", "nf4")
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
def capture_rows(decoder: nn.Module, layers: Sequence[int],
                 gather: Callable[[torch.Tensor], list[torch.Tensor]]) -> Iterator[dict]:
    """While active, keep `gather(hidden)` of the inputs of `decoder.layers[i]` (as "h{i}") and of the
    output of `decoder.norm` (as "final"); nothing else of the pass is kept."""
    captured: dict[str, list[torch.Tensor]] = {}

    def keep_input(name):
        def hook(module, args, kwargs):
            captured[name] = gather(args[0] if args else kwargs["hidden_states"])
        return hook

    def keep_output(module, args, output):
        captured["final"] = gather(output)

    handles = [decoder.layers[i].register_forward_pre_hook(keep_input(f"h{i}"), with_kwargs=True)
               for i in dict.fromkeys(layers)]
    handles.append(decoder.norm.register_forward_hook(keep_output))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class HFBackend:
    """A frozen transformers VLM with its tokenizer. Subclasses build prompts and media (`prepare`),
    name the decoder holding `.layers` and `.norm`, and the media input of the forward pass."""

    role: str
    name: str

    def __init__(self, model: nn.Module, tokenizer, path: str | Path | None = None, quant: str = "fp32"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.path = str(path) if path is not None else None
        self.quant = quant
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
        return {"name": self.name, "path": self.path, "config_hash": config_hash(self.model.config),
                "vocab_size": self.text_config.vocab_size, "hidden_size": self.text_config.hidden_size,
                "num_layers": self.text_config.num_hidden_layers, "quant": self.quant}

    def capture_layers(self) -> list[int]:
        return eagle3_layers(self.text_config.num_hidden_layers)

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight.detach()

    def embed_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight.detach()

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # ------------------------------------------------------------------------------ batches

    def make_batch(self, requests, prompts: list[list[int]], media: dict[str, torch.Tensor]) -> Batch:
        """Left-padded prompts plus media tensors, on the model's device."""
        input_ids, attention_mask = left_pad(prompts, self.pad_id)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        inputs |= {k: v.to(self.media_dtype) for k, v in media.items()}
        return Batch(requests=list(requests), inputs={k: v.to(self.device) for k, v in inputs.items()},
                     prompt_lens=[len(p) for p in prompts])

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int, ignore_eos: bool = False) -> list[list[int]]:
        """Batched greedy decoding with the KV cache. Rows are cut after their first EOS (kept);
        with `ignore_eos` every row runs `max_new_tokens` steps and nothing is cut."""
        if max_new_tokens <= 0:
            return [[] for _ in batch.requests]
        inputs = dict(batch.inputs)
        mask = inputs.pop("attention_mask")
        positions = positions_from_mask(mask)
        out = self.model(**inputs, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        steps, finished = [], torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        for step in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)                                   # [B]
            steps.append(token)
            finished |= token == self.eos_id
            if step + 1 == max_new_tokens or (finished.all() and not ignore_eos):
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                             cache=out.cache, use_cache=True, logits_to_keep=1)
        tokens = torch.stack(steps, dim=1).tolist()
        return tokens if ignore_eos else [cut_after_eos(t, self.eos_id) for t in tokens]

    @torch.no_grad()
    def teacher_forced(self, batch: Batch, responses: list[list[int]], layers: list[int]
                       ) -> dict[str, list[torch.Tensor]]:
        """One forward of prompt + responses[b][:-1] per batch (left padded, no LM head). Returns
        {"h{i}": [...], "final": [...]}, per request a [len(responses[b]), H] tensor on the CPU whose
        row i is at `vlms.alignment.feature_positions` (it predicts responses[b][i])."""
        bad = [i for i in layers if not 0 <= i < self.text_config.num_hidden_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for {self.text_config.num_hidden_layers} decoder layers")
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
