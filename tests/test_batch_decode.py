"""The fast decode path of extraction (vlms/batch_decode.py) on the tiny pair, graphs off (CPU): the same
tokens and feature rows, bit for bit, as the plain decode loop; and its bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from specalign.data.dsec import write_image
from specalign.data.samples import Request, Sample
from specalign.data.video import write_video
from specalign.train.extract import ExtractionModule
from specalign.vlms.eventgpt_backend import EventGPTBackend
from specalign.vlms.tiny import tiny_pair
from specalign.vlms.video_llava_backend import VideoLlavaBackend

from specalign.errors import SpecalignError

QUESTIONS = ["What is happening in this scene?", "Describe the objects.", "What color is the moving object?"]


@pytest.fixture(scope="module")
def requests(tmp_path_factory) -> list[Request]:
    """Three requests over two clips, prompts of different lengths (left padding)."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(1)
    samples = []
    for i in range(2):
        video = root / f"clip{i}.mp4"
        write_video(video, rng.integers(0, 256, (5, 48, 64, 3), dtype=np.uint8))
        images = [root / f"clip{i}_{k}.png" for k in range(3)]
        for path in images:
            write_image(path, rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
        samples.append(Sample(id=f"seq/{i:06d}", split="test", duration="1s", video_path=video,
                              event_images=images))
    return [Request(samples[i % 2], i, q) for i, q in enumerate(QUESTIONS)]


@pytest.fixture(scope="module")
def module() -> ExtractionModule:
    target, draft, tokenizer = tiny_pair(seed=0)
    return ExtractionModule(VideoLlavaBackend(target, tokenizer), EventGPTBackend(draft, tokenizer), 12)


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_fast_decode_equals_plain_decode(module, requests, ignore_eos):
    """Extraction's rows, tokens and features through the batched decoder equal the plain loop's exactly
    (with EOS honoured, the responses are cut and the steps stop early as on the plain path)."""
    eos = module.target.eos_id, module.draft.eos_id
    if not ignore_eos:  # the tiny pair's own EOS never comes in 12 tokens: stop at a token that does
        module.ignore_eos = True
        first = module.run(requests[:1])[0][0]
        module.target.eos_id, module.draft.eos_id = first["target_tokens"][4], first["draft_tokens"][4]
    module.ignore_eos = ignore_eos
    try:
        rows, feats = module.run(requests)
        for backend in (module.target, module.draft):
            backend.use_batch_decoder()
            assert backend.batch_decoder is not None
        fast_rows, fast_feats = module.run(requests)
    finally:
        module.target.batch_decoder = module.draft.batch_decoder = None
        module.target.eos_id, module.draft.eos_id = eos
    assert [(r["target_tokens"], r["draft_tokens"]) for r in rows] == \
        [(r["target_tokens"], r["draft_tokens"]) for r in fast_rows]
    assert list(feats) == list(fast_feats)
    for name in feats:
        assert torch.equal(feats[name], fast_feats[name]), name
    lengths = [len(r["target_tokens"]) for r in rows] + [len(r["draft_tokens"]) for r in rows]
    assert set(lengths) == {12} if ignore_eos else min(lengths) <= 5


def test_decoder_needs_a_static_cache_and_cuda_for_graphs(module):
    """auto: graphs and fused ops only on CUDA; other caches keep the plain loop; graphs asked for on the
    CPU are refused in one line naming the key."""
    try:
        module.use_fast_decode()
        assert not module.target.batch_decoder.cuda_graphs and not module.draft.batch_decoder.cuda_graphs
        with pytest.raises(SpecalignError, match="decode.cuda_graphs=true needs a CUDA device"):
            module.use_fast_decode(cuda_graphs=True)
        with pytest.raises(SpecalignError, match="decode.compile='yes': expected auto, true or false"):
            module.use_fast_decode(compile="yes")
    finally:
        module.target.batch_decoder = module.draft.batch_decoder = None
    target, _, tokenizer = tiny_pair(seed=0)
    dynamic = VideoLlavaBackend(target, tokenizer, kv_cache="dynamic")
    dynamic.use_batch_decoder()
    assert dynamic.batch_decoder is None
