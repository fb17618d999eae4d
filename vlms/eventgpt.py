"""EventGPT (the draft model): a LLaMA decoder reading CLIP features of event frames.

Parameter names follow the released checkpoint, so `EventChatForCausalLM.from_pretrained(dir)` loads it:

    model.embed_tokens, model.layers.N.*, model.norm, lm_head          LLaMA decoder
    model.visual_tower.visual_tower.vision_model.*                      CLIP ViT-L/14-336
    model.visual_projector.{0,2}                                        Linear(1024->H), GELU, Linear(H->H)
    model.feature_adaptor                                               optional Linear(H->H)

Pipeline for one request with T event frames:

    frames [T, 3, S, S] -> CLIP last hidden state (CLS kept) [T, N, C], N = 1 + (S / patch)^2 (577 at 336/14)
      -> visual_projector [T, N, H] -> feature_adaptor, once per frame [T, N, H]
      -> spatio-temporal pooling [T + N, H]: T temporal tokens (mean over the N tokens of each frame)
         followed by N spatial tokens (mean over the T frames)
      -> written into the input embeddings at the T + N `event_token_index` placeholders of the prompt.

The prompt carries one placeholder id per pooled token (see `num_event_tokens`), so sequence positions
are known before the forward pass; decoding steps after the prefill use the KV cache only.
"""

import json
import math
from pathlib import Path
from typing import ClassVar

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel, GenerationMixin, PreTrainedConfig
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

from specalign.errors import DataError

EVENT_TOKEN_INDEX = -200  # placeholder id of the released code (never embedded: replaced by features)

# CLIP ViT-L/14 at 336 px, the tower of the released checkpoints.
CLIP_VIT_L_14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}


@strict
class EventChatConfig(LlamaConfig):
    r"""LLaMA text config plus EventGPT's visual fields.

    mm_visual_tower (`str`, *optional*):
        Local directory of a CLIP checkpoint; the tower is read from it when the model checkpoint has no
        `model.visual_tower.*` weights. A relative path is resolved against the model directory first.
    mm_hidden_size (`int`): width of the CLIP features fed to the projector (1024 for ViT-L).
    vision_config (`dict` or `CLIPVisionConfig`): the CLIP tower. A released config.json has none: loading
        then takes it from the `mm_visual_tower` directory, else from the tower weights' shapes in the
        checkpoint (`EventChatForCausalLM.from_pretrained`), else ViT-L/14-336.
    use_feature_adaptor (`bool`, *optional*): build `model.feature_adaptor`; when unset, the adaptor exists
        when the released config key `event_feature_adaptor` exists, whatever its value (as the released
        code builds it).
    event_token_index (`int`): input id of the event placeholder (-200 as in the released code).
    """

    model_type = "EventChat_llama"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "vision_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=CLIP_VIT_L_14_336),
    }

    mm_visual_tower: str | None = None
    mm_hidden_size: int = 1024
    vision_config: dict | PreTrainedConfig | None = None
    use_feature_adaptor: bool | None = None
    event_token_index: int = EVENT_TOKEN_INDEX

    def __post_init__(self, **kwargs):
        if self.use_feature_adaptor is None:
            self.use_feature_adaptor = "event_feature_adaptor" in kwargs   # hasattr(config, ...) upstream
        super().__post_init__(**kwargs)


def num_event_tokens(config: EventChatConfig, num_frames: int) -> int:
    """Length of the pooled event features: T temporal + N spatial tokens."""
    vision = config.vision_config
    return num_frames + (vision.image_size // vision.patch_size) ** 2 + 1


def spatio_temporal_pool(features: torch.Tensor) -> torch.Tensor:
    """[B, T, N, H] -> [B, T + N, H]: per-frame means over tokens, then per-token means over frames."""
    temporal = features.mean(dim=2)  # [B, T, H]
    spatial = features.mean(dim=1)   # [B, N, H]
    return torch.cat([temporal, spatial], dim=1)


class CLIPVisionTransformer(nn.Module):
    """CLIP's vision transformer from transformers' CLIP parts, laid out as `CLIPVisionModel.vision_model`
    was when EventGPT was released. Plain modules (no nested PreTrainedModel), so parameter names are the
    checkpoint's literally and no key renaming happens on load or save."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # unused, kept for keys

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N_frames, 3, S, S] -> last hidden state, CLS kept: [N_frames, 1 + (S/patch)^2, C]."""
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        return self.encoder(inputs_embeds=hidden).last_hidden_state


class EventChatVisualTower(nn.Module):
    """`model.visual_tower`: its `visual_tower.vision_model` is the CLIP tower (the released key path)."""

    def __init__(self, vision_config: CLIPVisionConfig):
        super().__init__()
        self.visual_tower = nn.ModuleDict({"vision_model": CLIPVisionTransformer(vision_config)})

    @property
    def vision_model(self) -> CLIPVisionTransformer:
        return self.visual_tower["vision_model"]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.vision_model.embeddings.patch_embedding.weight.dtype)
        return self.vision_model(pixel_values)


class EventChatModel(LlamaModel):
    """The LLaMA decoder plus EventGPT's visual tower, projector and feature adaptor."""

    config: EventChatConfig

    def __init__(self, config: EventChatConfig):
        super().__init__(config)
        config.vision_config._attn_implementation = config._attn_implementation  # the tower's attention kernel
        self.visual_tower = EventChatVisualTower(config.vision_config)
        self.visual_projector = nn.Sequential(
            nn.Linear(config.mm_hidden_size, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )
        self.feature_adaptor = (
            nn.Linear(config.hidden_size, config.hidden_size) if config.use_feature_adaptor else None
        )
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CLIPVisionEmbeddings):  # as CLIPPreTrainedModel does
            init.normal_(module.class_embedding, mean=0.0, std=module.embed_dim**-0.5)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))

    def get_event_features(self, event_tensors: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, S, S] event frames -> [B, T + N, H] pooled features."""
        batch, frames = event_tensors.shape[:2]
        features = self.visual_projector(self.visual_tower(event_tensors.flatten(0, 1)))  # [B*T, N, H]
        if self.feature_adaptor is not None:
            features = self.feature_adaptor(features)                   # once per frame
        return spatio_temporal_pool(features.unflatten(0, (batch, frames)))

    def embed_with_events(self, input_ids: torch.Tensor, event_tensors: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, L, H] with the pooled event features written at the placeholders."""
        placeholder = input_ids == self.config.event_token_index                  # [B, L]
        embeds = self.embed_tokens(input_ids.masked_fill(placeholder, 0))
        features = self.get_event_features(event_tensors).to(embeds.dtype)       # [B, T + N, H]
        counts = placeholder.sum(dim=1)
        if not bool((counts == features.shape[1]).all()):
            raise ValueError(
                f"each prompt needs {features.shape[1]} event placeholders (T + N), found {counts.tolist()}"
            )
        return embeds.masked_scatter(placeholder.unsqueeze(-1), features)

    def forward(self, input_ids=None, event_tensors=None, inputs_embeds=None, **kwargs):
        """LlamaModel.forward; with `event_tensors` (the prefill) the embeddings are built here."""
        if event_tensors is not None:
            inputs_embeds = self.embed_with_events(input_ids, event_tensors)
            input_ids = None
        return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)


class EventChatForCausalLM(LlamaPreTrainedModel, GenerationMixin):
    config: EventChatConfig
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EventChatConfig):
        super().__init__(config)
        self.model = EventChatModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        event_tensors: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            event_tensors=event_tensors,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(self, *args, event_tensors=None, is_first_iteration=False, **kwargs):
        """Event frames go to the prefill only; later steps read the KV cache."""
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):
            inputs["event_tensors"] = event_tensors
        return inputs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a local checkpoint; a checkpoint without tower weights takes CLIP from `mm_visual_tower`."""
        model_dir = Path(pretrained_model_name_or_path)
        if not (model_dir / "config.json").is_file():
            raise DataError(model_dir, "no config.json: not an EventGPT checkpoint directory")
        wants_info = kwargs.pop("output_loading_info", False)
        if "config" not in kwargs:
            kwargs["config"] = released_config(model_dir)
        model, info = super().from_pretrained(model_dir, *args, output_loading_info=True, **kwargs)
        if any(key.startswith("model.visual_tower.") for key in info["missing_keys"]):
            model.model.visual_tower.visual_tower["vision_model"] = _load_clip_tower(model, model_dir)
            info["missing_keys"] = {k for k in info["missing_keys"] if not k.startswith("model.visual_tower.")}
        return (model, info) if wants_info else model


TOWER_PREFIX = "model.visual_tower.visual_tower.vision_model."


def released_config(model_dir: Path) -> EventChatConfig:
    """The checkpoint's config; when config.json names no `vision_config` (the released files), the tower's
    config comes from the local `mm_visual_tower` directory, else from the tower weights in the checkpoint,
    else stays ViT-L/14-336 (the tower is then read from `mm_visual_tower` after loading)."""
    config = EventChatConfig.from_pretrained(model_dir)
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(model_dir / "config.json", f"not valid JSON ({e})") from None
    if "vision_config" in raw:
        return config
    shapes = checkpoint_shapes(model_dir)
    tower_dir = _tower_dir(model_dir, config.mm_visual_tower)
    if tower_dir is not None and (tower_dir / "config.json").is_file():
        config.vision_config = CLIPVisionConfig.from_pretrained(tower_dir)
    elif any(k.startswith(TOWER_PREFIX) for k in shapes):
        config.vision_config = tower_config_from_shapes(shapes, model_dir)
    if "model.visual_projector.0.weight" in shapes:
        config.mm_hidden_size = shapes["model.visual_projector.0.weight"][1]
    return config


def checkpoint_shapes(model_dir: Path) -> dict[str, list[int]]:
    """{tensor name: shape} over the checkpoint's safetensors files (headers only)."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            shapes.update({k: list(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
    return shapes


def tower_config_from_shapes(shapes: dict[str, list[int]], where: Path) -> CLIPVisionConfig:
    """A CLIP vision config that fits the tower weights: width and patch from the patch embedding, image
    size from the position embedding, depth from the layer count, heads at CLIP's 64 channels each."""
    def shape(name: str) -> list[int]:
        if TOWER_PREFIX + name not in shapes:
            raise DataError(where, f"the checkpoint's visual tower lacks {TOWER_PREFIX + name}",
                            "give the tower's config as vision_config in config.json, or mm_visual_tower")
        return shapes[TOWER_PREFIX + name]

    width, _, patch, _ = shape("embeddings.patch_embedding.weight")
    positions = shape("embeddings.position_embedding.weight")[0]
    side = math.isqrt(positions - 1)
    layers = 1 + max(int(k[len(TOWER_PREFIX):].split(".")[2]) for k in shapes
                     if k.startswith(TOWER_PREFIX + "encoder.layers."))
    return CLIPVisionConfig(**{**CLIP_VIT_L_14_336, "hidden_size": width, "patch_size": patch,
                               "image_size": side * patch, "num_hidden_layers": layers,
                               "intermediate_size": shape("encoder.layers.0.mlp.fc1.weight")[0],
                               "num_attention_heads": max(1, width // 64)})


def _tower_dir(model_dir: Path, tower: str | None) -> Path | None:
    """`mm_visual_tower` as a local directory: relative to the model directory first, else as given."""
    if not tower:
        return None
    return model_dir / tower if (model_dir / tower).is_dir() else Path(tower)


def _load_clip_tower(model: EventChatForCausalLM, model_dir: Path) -> CLIPVisionTransformer:
    """The CLIP tower read from the local `mm_visual_tower` directory (never quantised), on the device and
    in the dtype of the model's embeddings."""
    tower_dir = _tower_dir(model_dir, model.config.mm_visual_tower)
    if tower_dir is None:
        raise DataError(model_dir, "checkpoint has no visual tower weights and config has no mm_visual_tower")
    if not (tower_dir / "config.json").is_file():
        raise DataError(tower_dir, "mm_visual_tower is not a local CLIP checkpoint directory",
                        hint="set mm_visual_tower in config.json to a local path")
    clip = CLIPVisionModel.from_pretrained(tower_dir, dtype=torch.float32)
    model.config.vision_config = clip.config
    tower = CLIPVisionTransformer(clip.config)
    tower.load_state_dict(clip.state_dict())
    embed = model.get_input_embeddings().weight
    return tower.to(device=embed.device, dtype=embed.dtype).eval()


AutoConfig.register(EventChatConfig.model_type, EventChatConfig, exist_ok=True)
