"""The two VLM backends on the tiny pair: prompts and media, batched greedy decoding, teacher-forced
feature rows (THE alignment test), loading from local directories, 4-bit loading."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from specalign.data.dsec import write_image
from specalign.data.samples import Request, Sample
from specalign.data.video import write_video
from specalign.vlms import eventgpt_backend, video_llava
from specalign.vlms.alignment import feature_positions
from specalign.vlms.eventgpt import EVENT_TOKEN_INDEX, num_event_tokens
from specalign.vlms.eventgpt_backend import EventGPTBackend
from specalign.vlms.hf_backend import CLIP_MEAN, CLIP_STD, clip_preprocess
from specalign.vlms.registry import build_backends
from specalign.vlms.tiny import save_tiny_pair, tiny_pair
from specalign.vlms.video_llava import video_tokens_per_frame
from specalign.vlms.video_llava_backend import VideoLlavaBackend
from torch import nn

from specalign.errors import DataError

QUESTIONS = ["What is happening in this scene?", "Describe the objects and their motion.",
             "What color is the moving object and which direction is it moving?", "What shape?"]
MAX_NEW = 10


@pytest.fixture(scope="module")
def requests(tmp_path_factory) -> list[Request]:
    """Four requests over three clips (different frame counts and sizes), prompts of different lengths."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(3):
        video = root / f"clip{i}.mp4"
        write_video(video, rng.integers(0, 256, (5 + 2 * i, 48, 64, 3), dtype=np.uint8))
        images = []
        for k in range(3):
            images.append(root / f"clip{i}_{k}.png")
            write_image(images[-1], rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
        samples.append(Sample(id=f"seq/{i:06d}", split="test", duration="1s", video_path=video,
                              event_images=images))
    return [Request(samples[i % 3], i, q) for i, q in enumerate(QUESTIONS)]


@pytest.fixture(scope="module")
def pair():
    target, draft, tokenizer = tiny_pair(seed=0)
    return VideoLlavaBackend(target, tokenizer), EventGPTBackend(draft, tokenizer)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module", params=["target", "draft"])
def backend(request, pair):
    return pair[0] if request.param == "target" else pair[1]


def test_clip_preprocess_resizes_crops_and_normalises():
    frame = np.full((40, 60, 3), (255, 128, 0), dtype=np.uint8)
    out = clip_preprocess(np.stack([frame, frame]), 56)
    assert out.shape == (2, 3, 56, 56)
    expected = (torch.tensor([255.0, 128.0, 0.0]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), expected, atol=1e-5, rtol=0)
    ramp = np.repeat(np.arange(60, dtype=np.uint8)[None, :, None], 40, 0).repeat(3, 2)  # brighter to the right
    resized = clip_preprocess([ramp], 28)[0, 0]
    assert resized.shape == (28, 28) and bool((resized[:, 1:] >= resized[:, :-1]).all())


def test_prepare_target(pair, requests):
    target = pair[0]
    batch = target.prepare(requests)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert batch.inputs["pixel_values_videos"].shape == (4, 8, 3, 28, 28)
    per_video = 8 * video_tokens_per_frame(target.model.config)
    assert per_video == 8 * 5
    for b, P in enumerate(batch.prompt_lens):
        assert mask[b].sum() == P and bool(mask[b, ids.shape[1] - P:].all())      # left padded
        assert (ids[b] == target.model.config.video_token_index).sum() == per_video
        assert ids[b, ids.shape[1] - P] == target.tokenizer.bos_token_id
        text = target.decode(ids[b, ids.shape[1] - P:])
        assert text.startswith("user : ") and text.endswith(" assistant :")
    assert len(set(batch.prompt_lens)) > 1


def test_prepare_draft(pair, requests):
    draft = pair[1]
    batch = draft.prepare(requests)
    ids = batch.inputs["input_ids"]
    assert batch.inputs["event_tensors"].shape == (4, 3, 3, 56, 56)
    for b, P in enumerate(batch.prompt_lens):
        assert (ids[b] == EVENT_TOKEN_INDEX).sum() == num_event_tokens(draft.model.config, 3) == 3 + 17
        text = draft.decode([t for t in ids[b, ids.shape[1] - P:].tolist() if t >= 0])
        assert text.startswith("a chat between a curious human") and text.endswith(" assistant :")


def test_prompt_templates(pair):
    target, draft = pair
    assert target.prompt_template() == "USER: <video>\n{question} ASSISTANT:"
    assert draft.prompt_template() == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: <event>\n{question} ASSISTANT:")


def test_batched_generation_equals_per_sample(backend, requests):
    batched = backend.generate(backend.prepare(requests), MAX_NEW)
    single = [backend.generate(backend.prepare([r]), MAX_NEW)[0] for r in requests]
    assert batched == single
    assert len({tuple(r) for r in batched}) > 1  # the media and questions matter


def test_generation_cut_after_first_eos(backend, requests):
    batch = backend.prepare(requests)
    cut = backend.generate(batch, 40)
    full = backend.generate(batch, 40, ignore_eos=True)
    eos = backend.eos_id
    assert all(len(f) == 40 for f in full)
    assert cut == [f[: f.index(eos) + 1] if eos in f else f for f in full]
    if backend.role == "draft":  # the tiny draft ends some of these responses early
        assert any(len(c) < 40 for c in cut)


def test_teacher_forced_rows_predict_the_response(backend, requests):
    """THE alignment test: row i of `final`, through the LM head, predicts response token i."""
    batch = backend.prepare(requests)
    responses = backend.generate(batch, MAX_NEW)
    layers = backend.capture_layers()
    feats = backend.teacher_forced(batch, responses, layers)
    assert list(feats) == [f"h{i}" for i in layers] + ["final"]
    head = backend.lm_head_weight()
    for b, response in enumerate(responses):
        for name in feats:
            assert feats[name][b].shape == (len(response), backend.text_config.hidden_size)
        assert (feats["final"][b] @ head.T).argmax(-1).tolist() == response


def stops_early(backend, requests):
    """A copy of `backend` whose EOS logit is 1.05 x the logit of a word the original emits at step 4 of
    request 0: it ends request 0 there and the others wherever that word would have won, if anywhere."""
    word = backend.generate(backend.prepare(requests[:1]), 5, ignore_eos=True)[0][4]
    model = copy.deepcopy(backend.model)
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[backend.eos_id] = 1.05 * head[word]
    return type(backend)(model, backend.tokenizer)


def assert_same_rows(got: dict, expected: dict, n_rows: list[int]) -> None:
    assert list(got) == list(expected)
    for name, rows in expected.items():
        assert [tuple(t.shape) for t in got[name]] == [(n, rows[0].shape[-1]) for n in n_rows], name
        for b, (g, e) in enumerate(zip(got[name], rows)):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-5, msg=lambda m, name=name, b=b: f"{name}[{b}]: {m}")


def test_rows_captured_while_decoding_equal_teacher_forced_rows(backend, requests):
    """`generate(capture_layers=...)` keeps the rows of the prefill's last position and of each decode step:
    the teacher-forced rows, every row of every request of a left-padded batch of mixed prompt lengths and
    response lengths (some cut at EOS while the others go on)."""
    early = stops_early(backend, requests)
    batch = early.prepare(requests)
    layers = early.capture_layers()
    responses, feats = early.generate(batch, 12, capture_layers=layers)
    assert responses == early.generate(batch, 12)
    lengths = [len(r) for r in responses]
    assert len(set(batch.prompt_lens)) > 1 and len(set(lengths)) > 1
    assert responses[0][-1] == early.eos_id and len(responses[0]) == 5
    assert_same_rows(feats, early.teacher_forced(batch, responses, layers), lengths)
    head = early.lm_head_weight()
    for b, response in enumerate(responses):  # the captured final rows chose the tokens: exact
        assert (feats["final"][b] @ head.T).argmax(-1).tolist() == response


def test_teacher_forcing_on_the_cached_prompt_equals_teacher_forced(backend, pair, requests):
    """`generate_and_teacher_force`: the model's own responses as `generate`, and the rows of other responses
    (the target's, cut to mixed lengths: right padded on top of the left-padded cached prompt) as
    `teacher_forced`."""
    target = pair[0]
    forced = [r[:n] for r, n in zip(target.generate(target.prepare(requests), MAX_NEW), (MAX_NEW, 1, 6, 0))]
    batch = backend.prepare(requests)
    layers = backend.capture_layers()
    own, feats = backend.generate_and_teacher_force(batch, MAX_NEW, forced, layers)
    assert own == backend.generate(batch, MAX_NEW)
    assert_same_rows(feats, backend.teacher_forced(batch, forced, layers), [len(r) for r in forced])
    _, eos_cut = backend.generate_and_teacher_force(batch, 40, forced, layers)  # decoding cut at EOS: same rows
    assert_same_rows(eos_cut, feats, [len(r) for r in forced])


def test_kv_caches_decode_and_capture_the_same(backend, pair, requests):
    """The growing (dynamic) cache and the preallocated (static, default) one give the same responses and
    rows; the host-memory cache needs CUDA and says so; an unknown cache is refused."""
    assert backend.kv_cache == "static"
    dynamic = type(backend)(backend.model, backend.tokenizer, kv_cache="dynamic")
    batch = backend.prepare(requests)
    layers = backend.capture_layers()
    forced = pair[0].generate(pair[0].prepare(requests), MAX_NEW)
    static_out = backend.generate_and_teacher_force(batch, MAX_NEW, forced, layers)
    dynamic_out = dynamic.generate_and_teacher_force(batch, MAX_NEW, forced, layers)
    assert static_out[0] == dynamic_out[0]
    assert_same_rows(static_out[1], dynamic_out[1], [len(r) for r in forced])
    responses, feats = dynamic.generate(batch, MAX_NEW, capture_layers=layers)
    assert (responses, list(feats)) == backend.generate(batch, MAX_NEW, capture_layers=layers)[0:1] + (list(feats),)
    offloaded = type(backend)(backend.model, backend.tokenizer, kv_cache="offloaded")
    with pytest.raises(ValueError, match="CUDA"):
        offloaded.generate(batch, MAX_NEW)
    with pytest.raises(ValueError, match="kv_cache"):
        type(backend)(backend.model, backend.tokenizer, kv_cache="paged")


def test_captured_layers_are_hidden_states_at_feature_positions(pair, requests):
    """h{i} is transformers' hidden_states[i] (input of decoder layer i), unaffected by left padding."""
    target = pair[0]
    batch = target.prepare(requests)
    responses = target.generate(batch, MAX_NEW)
    layers = target.capture_layers()
    feats = target.teacher_forced(batch, responses, layers)
    b = 2
    one = target.prepare([requests[b]])
    ids = torch.cat([one.inputs["input_ids"], torch.tensor([responses[b][:-1]])], dim=1)
    with torch.no_grad():
        out = target.model.model(input_ids=ids, pixel_values_videos=one.inputs["pixel_values_videos"],
                                 output_hidden_states=True)
    rows = feature_positions(one.prompt_lens[0], len(responses[b]))
    for i in layers:
        torch.testing.assert_close(feats[f"h{i}"][b], out.hidden_states[i][0, rows], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats["final"][b], out.last_hidden_state[0, rows], atol=1e-4, rtol=1e-4)


def test_draft_rows_line_up_with_target_rows(pair, requests):
    target, draft = pair
    responses = target.generate(target.prepare(requests), MAX_NEW)
    feats = draft.teacher_forced(draft.prepare(requests), responses, draft.capture_layers())
    assert [len(t) for t in feats["final"]] == [len(r) for r in responses]
    assert all(len(feats[k]) == len(requests) for k in feats)


def test_capture_layers_and_identity(pair):
    target, draft = pair
    assert target.capture_layers() == draft.capture_layers() == [2, 4, 5]
    ids = target.identity(), draft.identity()
    for ident, backend in zip(ids, pair):
        assert set(ident) >= {"name", "path", "config_hash", "vocab_size", "hidden_size", "num_layers"}
        assert backend.lm_head_weight().shape == (ident["vocab_size"], ident["hidden_size"])
        assert backend.embed_weight().shape == (ident["vocab_size"], ident["hidden_size"])
    assert ids[0]["vocab_size"] == 128 > ids[1]["vocab_size"] == len(target.tokenizer)
    assert ids[0]["config_hash"] != ids[1]["config_hash"]


def test_draft_batch_needs_equal_frame_counts(pair, requests):
    sample = replace(requests[0].sample, id="other", event_images=requests[0].sample.event_images[:2])
    with pytest.raises(ValueError, match="event frame counts"):
        pair[1].prepare([requests[0], Request(sample, 0, "What?")])


def test_saved_tiny_pair_loads_and_decodes_the_same(pair, saved, requests):
    target_dir, draft_dir = saved
    target, draft = VideoLlavaBackend.from_pretrained(target_dir, quant="fp32"), EventGPTBackend.from_pretrained(draft_dir, quant="fp32")
    assert not hasattr(target.model.model, "image_tower")                     # not loaded by default
    assert hasattr(VideoLlavaBackend.from_pretrained(target_dir, quant="fp32", load_image_tower=True).model.model, "image_tower")
    for loaded, built in zip((target, draft), pair):
        assert loaded.identity()["config_hash"] == built.identity()["config_hash"]
        assert loaded.generate(loaded.prepare(requests), MAX_NEW) == built.generate(built.prepare(requests), MAX_NEW)


def test_missing_config_names_the_directory(tmp_path):
    for load in (VideoLlavaBackend.from_pretrained, EventGPTBackend.from_pretrained):
        with pytest.raises(DataError, match=str(tmp_path)):
            load(tmp_path)


def test_dense_module_names_are_full_module_paths(pair):
    """The names kept out of 4-bit are real module paths of each model."""
    target, draft = pair
    target_modules = dict(target.model.named_modules())
    draft_modules = dict(draft.model.named_modules())
    assert all(name in target_modules for name in video_llava.DENSE_MODULES + video_llava.TOWERS)
    assert all(name in draft_modules for name in eventgpt_backend.DENSE_MODULES + (eventgpt_backend.TOWER,))


def test_nf4_keeps_towers_and_projectors_dense(saved):
    pytest.importorskip("accelerate", reason="transformers' bitsandbytes 4-bit loading requires the "
                        "`accelerate` package, which is not installed here")
    bnb = pytest.importorskip("bitsandbytes")
    target_dir, draft_dir = saved
    target = VideoLlavaBackend.from_pretrained(target_dir, quant="nf4", compute_dtype=torch.float32)
    model = target.model
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    tower_linears = [m for m in model.model.video_tower.modules() if isinstance(m, nn.Linear)]
    assert tower_linears and not any(isinstance(m, bnb.nn.Linear4bit) for m in tower_linears)
    assert not isinstance(model.model.multi_modal_projector.linear_1, bnb.nn.Linear4bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    quantized = VideoLlavaBackend.from_pretrained(target_dir, quant="nf4", quantize_towers=True, compute_dtype=torch.float32)
    assert isinstance(quantized.model.model.video_tower.encoder.layers[0].mlp.fc1, bnb.nn.Linear4bit)
    draft = EventGPTBackend.from_pretrained(draft_dir, quant="nf4", compute_dtype=torch.float32)
    assert not isinstance(draft.model.model.visual_projector[0], bnb.nn.Linear4bit)


def test_nf4_heads_are_stored_as_the_weight_they_multiply_by(saved, requests):
    """quantize_head=True: the LM head is 4-bit and `lm_head_weight` dequantises it: the captured final rows
    through that weight give the 4-bit head's logits (up to the kernel's rounding, well below the spread of
    a dense head's logits from a 4-bit one) and choose the decoded tokens wherever the top two logits are
    further apart than that rounding."""
    pytest.importorskip("accelerate", reason="transformers' bitsandbytes 4-bit loading requires `accelerate`")
    bnb = pytest.importorskip("bitsandbytes")
    target_dir, draft_dir = saved
    # the target only: bitsandbytes' CPU kernels need a 4-bit layer's outputs in multiples of 32 (the tiny
    # draft's vocabulary is 109); the draft's head goes through the same HFBackend code
    assert isinstance(EventGPTBackend.from_pretrained(draft_dir, quant="nf4", quantize_head=True).model.lm_head, bnb.nn.Linear4bit)
    for backend in (VideoLlavaBackend.from_pretrained(target_dir, quant="nf4", quantize_head=True, compute_dtype=torch.float32),):
        assert isinstance(backend.model.lm_head, bnb.nn.Linear4bit)
        head = backend.lm_head_weight()
        assert head.shape == (backend.text_config.vocab_size, backend.text_config.hidden_size)
        assert head.dtype == torch.float32
        batch = backend.prepare(requests)
        responses, feats = backend.generate(batch, MAX_NEW, capture_layers=backend.capture_layers())
        final = torch.cat(feats["final"])                                            # [N, H]
        with torch.no_grad():                                                        # as when decoding
            ours, theirs = final @ head.T, backend.model.lm_head(final[:, None])[:, 0]  # [N, V]
        rounding = (ours - theirs).abs().max()
        assert rounding < 0.1 * ours.std()
        top = theirs.topk(2, dim=-1).values
        clear = (top[:, 0] - top[:, 1]) > 2 * rounding
        tokens = torch.tensor([t for r in responses for t in r])
        assert clear.float().mean() > 0.5
        assert torch.equal(ours.argmax(-1)[clear], tokens[clear])
        torch.testing.assert_close(backend.lm_head_weight(), head)   # the same after the kernels repacked it


def test_build_backends(saved):
    target, draft = build_backends({"tiny": True, "quant": "fp32"}, "cpu")
    assert (target.role, draft.role) == ("target", "draft")
    assert (type(target), type(draft)) == (VideoLlavaBackend, EventGPTBackend)
    swapped = {"tiny": True, "quant": "fp32", "target": {"kind": "eventgpt"}, "draft": {"kind": "video_llava"}}
    target, draft = build_backends(swapped, "cpu")                  # the backends are picked by kind, not role
    assert (type(target), type(draft), target.role, draft.role) == (EventGPTBackend, VideoLlavaBackend,
                                                                     "target", "draft")
    with pytest.raises(DataError, match="unknown VLM 'llava_next'"):
        build_backends({"tiny": True, "quant": "fp32", "target": {"kind": "llava_next"}})
    target_dir, draft_dir = saved
    cfg = {"target": {"path": str(target_dir)}, "draft": {"path": str(draft_dir)}, "quant": "fp32"}
    assert build_backends(cfg)[0].path == str(target_dir)
    with pytest.raises(DataError, match="models.draft.path"):
        build_backends({"target": {"path": str(target_dir)}, "draft": {"path": "???"}, "quant": "fp32"})
