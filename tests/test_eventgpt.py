"""EventGPT modeling: checkpoint key names, loading, the event pipeline, generation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from specalign.vlms.eventgpt import (
    EVENT_TOKEN_INDEX,
    EventChatConfig,
    EventChatForCausalLM,
    num_event_tokens,
    spatio_temporal_pool,
)
from specalign.vlms.tiny import build_tokenizer, tiny_draft_config
from transformers import CLIPVisionModel

from specalign.errors import DataError

# The released checkpoint's names (docs/design.md, "The two VLMs"), literally.
RELEASED_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.",
                     "model.visual_tower.visual_tower.vision_model.", "model.visual_projector.0.",
                     "model.visual_projector.2.", "model.feature_adaptor.")
RELEASED_KEYS = [
    "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.7.mlp.down_proj.weight",
    "model.norm.weight", "lm_head.weight",
    "model.visual_tower.visual_tower.vision_model.embeddings.patch_embedding.weight",
    "model.visual_tower.visual_tower.vision_model.embeddings.class_embedding",
    "model.visual_tower.visual_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
    "model.visual_tower.visual_tower.vision_model.post_layernorm.weight",
    "model.visual_projector.0.weight", "model.visual_projector.2.bias", "model.feature_adaptor.weight",
]


@pytest.fixture(scope="module")
def config() -> EventChatConfig:
    return tiny_draft_config(build_tokenizer())


@pytest.fixture(scope="module")
def model(config) -> EventChatForCausalLM:
    torch.manual_seed(0)
    return EventChatForCausalLM(config).eval()


def prompt(config, frames: int) -> torch.Tensor:
    return torch.tensor([[1, 8, 9] + [EVENT_TOKEN_INDEX] * num_event_tokens(config, frames) + [10, 11, 12]])


def events(config, batch: int = 1, frames: int = 3) -> torch.Tensor:
    size = config.vision_config.image_size
    return torch.randn(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(1))


def logits(model, config, frames=3):
    with torch.no_grad():
        return model(input_ids=prompt(config, frames), event_tensors=events(config, frames=frames)).logits


def test_state_dict_keys_are_the_released_names(model, tmp_path):
    keys = set(model.state_dict())
    assert set(RELEASED_KEYS) <= keys
    assert all(k.startswith(RELEASED_PREFIXES) for k in keys), sorted(k for k in keys if not k.startswith(
        RELEASED_PREFIXES))
    model.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "model.safetensors")) == keys
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "EventChat_llama"


def test_from_pretrained_round_trip(model, config, tmp_path):
    model.save_pretrained(tmp_path)
    loaded, info = EventChatForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(loaded, config), logits(model, config), rtol=0, atol=0)


def test_released_config_keys_load(model, config, tmp_path):
    """A released-style config.json: no `use_feature_adaptor`, the adaptor flagged by `event_feature_adaptor`."""
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["use_feature_adaptor"]
    cfg["event_feature_adaptor"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = EventChatForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.feature_adaptor is not None
    torch.testing.assert_close(logits(loaded, config), logits(model, config), rtol=0, atol=0)


def test_tower_from_mm_visual_tower_when_checkpoint_lacks_it(model, config, tmp_path):
    torch.manual_seed(3)
    clip = CLIPVisionModel(config.vision_config)
    clip.save_pretrained(tmp_path / "clip")
    ckpt = tmp_path / "eventgpt"
    model.save_pretrained(ckpt)
    weights = {k: v for k, v in load_file(ckpt / "model.safetensors").items() if "visual_tower" not in k}
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(cfg | {"mm_visual_tower": "../clip"}))

    loaded = EventChatForCausalLM.from_pretrained(ckpt)
    tower = loaded.model.visual_tower.vision_model
    torch.testing.assert_close(tower.embeddings.patch_embedding.weight, clip.embeddings.patch_embedding.weight)

    (ckpt / "config.json").write_text(json.dumps(cfg | {"mm_visual_tower": "../nowhere"}))
    with pytest.raises(DataError, match="mm_visual_tower"):
        EventChatForCausalLM.from_pretrained(ckpt)


def test_missing_config_names_the_directory(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        EventChatForCausalLM.from_pretrained(tmp_path)


def test_feature_adaptor_applied_once_per_frame(model, config):
    """The adaptor sees every frame's projected tokens exactly once, before pooling."""
    core = model.model
    seen = []
    handle = core.feature_adaptor.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        ev = events(config, batch=2, frames=3)
        with torch.no_grad():
            pooled = core.get_event_features(ev)
            projected = core.visual_projector(core.visual_tower(ev.flatten(0, 1)))
            expected = spatio_temporal_pool(core.feature_adaptor(projected).unflatten(0, (2, 3)))
    finally:
        handle.remove()
    tokens = num_event_tokens(config, 0)
    assert seen[0] == (2 * 3, tokens, config.hidden_size)        # one pass over all frames
    torch.testing.assert_close(pooled, expected)
    assert pooled.shape == (2, 3 + tokens, config.hidden_size)


def test_spatio_temporal_pool():
    features = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)  # [B, T, N, H]
    pooled = spatio_temporal_pool(features)
    assert pooled.shape == (2, 3 + 4, 5)
    torch.testing.assert_close(pooled[:, :3], features.mean(dim=2))   # temporal: mean over tokens
    torch.testing.assert_close(pooled[:, 3:], features.mean(dim=1))   # spatial: mean over frames


def test_real_resolution_gives_t_plus_577_tokens():
    """ViT-L/14 geometry at 336 px (tower width shrunk): T temporal + 577 spatial tokens."""
    config = EventChatConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, mm_hidden_size=8, use_feature_adaptor=True,
                             vision_config={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                                            "num_attention_heads": 1, "image_size": 336, "patch_size": 14})
    assert EventChatConfig().vision_config.image_size == 336  # the default tower is ViT-L/14-336
    assert num_event_tokens(config, 5) == 5 + 577
    model = EventChatForCausalLM(config).eval()
    with torch.no_grad():
        pooled = model.model.get_event_features(torch.randn(1, 2, 3, 336, 336))
    assert pooled.shape == (1, 2 + 577, 16)


def test_placeholder_count_is_checked(model, config):
    ids = prompt(config, 3)[:, :-5]  # lost some placeholders
    with pytest.raises(ValueError, match="event placeholders"):
        model(input_ids=ids, event_tensors=events(config))


def test_hf_generate_with_kv_cache_matches_full_recompute(model, config):
    """generate(): the prefill splices the events, later steps read the KV cache only."""
    ids, ev = prompt(config, 3), events(config)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), event_tensors=ev,
                         max_new_tokens=6, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    seq = ids
    with torch.no_grad():
        for token in new:
            assert int(model(input_ids=seq, event_tensors=ev).logits[0, -1].argmax()) == token
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)


# ---------------------------------------------------------------------------- released checkpoints

def released_style(model, tmp_path, **config_changes):
    """The model saved as the released files are: no vision_config in config.json, the tower named by
    `mm_visual_tower` (a hub id, not a local directory) and its weights inside the checkpoint."""
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("vision_config", "use_feature_adaptor")}
    cfg |= {"mm_visual_tower": "openai/clip-vit-large-patch14-336", "event_feature_adaptor": True,
            **config_changes}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_tower_config_from_the_weights_when_config_names_none(tmp_path):
    """A small tower with CLIP's 64 channels per head, not ViT-L/14-336: its width, patch, image size, depth,
    MLP width and the projector's input width come from the weights."""
    tower = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 1,
             "patch_size": 14, "image_size": 42}
    config = tiny_draft_config(build_tokenizer()).to_dict() | {"vision_config": tower, "mm_hidden_size": 64}
    config = EventChatConfig(**{k: v for k, v in config.items() if k not in ("model_type", "transformers_version")})
    torch.manual_seed(0)
    model = EventChatForCausalLM(config).eval()
    loaded = EventChatForCausalLM.from_pretrained(released_style(model, tmp_path))
    vision = loaded.config.vision_config
    assert {k: getattr(vision, k) for k in tower} == tower and loaded.config.mm_hidden_size == 64
    torch.testing.assert_close(logits(loaded, config), logits(model, config), rtol=0, atol=0)


def test_tower_config_from_a_local_mm_visual_tower(model, config, tmp_path):
    CLIPVisionModel(config.vision_config).config.save_pretrained(tmp_path / "clip")
    loaded = EventChatForCausalLM.from_pretrained(released_style(model, tmp_path / "ckpt", mm_visual_tower="../clip"))
    assert loaded.config.vision_config.image_size == config.vision_config.image_size
    torch.testing.assert_close(logits(loaded, config), logits(model, config), rtol=0, atol=0)


def test_feature_adaptor_exists_when_its_key_exists(model, config, tmp_path):
    """As the released code (`hasattr(config, "event_feature_adaptor")`): the key's value does not matter."""
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["use_feature_adaptor"]
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"event_feature_adaptor": False}))
    loaded = EventChatForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.feature_adaptor is not None
    torch.testing.assert_close(logits(loaded, config), logits(model, config), rtol=0, atol=0)
    assert EventChatConfig(vocab_size=16).use_feature_adaptor is False


def test_tokenizer_beside_the_checkpoint_is_optional(tmp_path):
    """Without tokenizer files the draft uses the target's tokenizer when config.json has the ids it gives."""
    from specalign.vlms.registry import build_backends
    from specalign.vlms.tiny import save_tiny_pair

    target_dir, draft_dir = save_tiny_pair(tmp_path)
    with_tokenizer = build_backends({"target": {"path": target_dir}, "draft": {"path": draft_dir}, "quant": "fp32"})[1]
    for f in draft_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    target, draft = build_backends({"target": {"path": target_dir}, "draft": {"path": draft_dir}, "quant": "fp32"})
    assert draft.tokenizer is target.tokenizer and draft.eos_id == with_tokenizer.eos_id
    assert draft.prompt_ids("What is happening?", 3) == with_tokenizer.prompt_ids("What is happening?", 3)
    cfg = json.loads((draft_dir / "config.json").read_text())
    (draft_dir / "config.json").write_text(json.dumps(cfg | {"eos_token_id": 7}))
    with pytest.raises(DataError, match=rf"{draft_dir}: no tokenizer beside the checkpoint, and its config.json's ids"):
        build_backends({"target": {"path": target_dir}, "draft": {"path": draft_dir}, "quant": "fp32"})
