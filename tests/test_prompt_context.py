"""The prompt context of EAGLE-3 (issue 14 part 2): the store carries, per row, the prompt row, the last
prompt token and the pooled video rows (format 2); EAGLE-3 reads them so that its first round proposes;
batched `chain_runs` still equals round by round; a store without the context is refused in one line."""

import json

import pytest
import torch
from conftest_train import LAYERS, TINY_EAGLE3, VIDEO_ROWS, H, V, make_store, target_head, train_config
from specalign.adapters.eagle3 import (
    Eagle3Config,
    Eagle3Drafter,
    Eagle3Type,
    PromptRows,
    build_vocab_maps,
    context_inputs,
)
from specalign.data.store import FORMAT_VERSION, FeatureStore, StoreWriter, drop_nonfinite
from specalign.specdec.metrics import rounds_from_runs, simulate_greedy
from specalign.train.datamodule import pad
from specalign.vlms.alignment import prompt_row_position, video_summary
from test_chain_runs import GAMMAS, assert_same_rounds, responses_near

from specalign.errors import StoreMismatch

NAMES = [f"target.h{i}" for i in LAYERS]


def drafter(seed: int = 0, source: str = "target") -> Eagle3Drafter:
    torch.manual_seed(seed)
    width = 3 * H if source == "target" else 3 * H + 3 * 16
    names = NAMES + ([f"draft.h{i}" for i in LAYERS] if source == "both" else [])
    c = Eagle3Config(hidden_size=H, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=V, draft_vocab_size=16, feature_source=source, feature_names=names,
                     fc_in_features=width, aux_layer_ids=LAYERS, ttt_steps=3, prompt_context=True,
                     context_features=NAMES, video_rows=VIDEO_ROWS, video_token_id=5)
    m = Eagle3Drafter(c).eval()
    d2t, t2d = build_vocab_maps(torch.arange(V).flip(0), 16)
    m.d2t.copy_(d2t)
    m.t2d.copy_(t2d)
    return m


def test_store_round_trips_the_context_and_states_its_version(tmp_path):
    store = FeatureStore(make_store(tmp_path / "s"))
    assert store.manifest["format_version"] == FORMAT_VERSION == 2
    assert store.context_spec["video_rows"] == VIDEO_ROWS and store.context_spec["features"] == NAMES
    head = target_head()
    for row in store.rows:                     # what make_store wrote: prompt row's high layer = 4 lm_head[r_0]
        prompt = store.context(row, f"prompt.target.h{LAYERS[-1]}").float()
        torch.testing.assert_close(prompt[0], (4 * head[row.target_tokens[0]]).bfloat16().float())
        assert store.context(row, "video.target.h1").shape == (VIDEO_ROWS, H)
        assert store.context(row, "prompt.token").tolist() == [7]
        item = context_inputs(store, row, NAMES + ["draft.h1"], NAMES)          # EventGPT's part: zeros
        assert item["prompt"].shape == (4 * H,) and item["video"].shape == (VIDEO_ROWS, 4 * H)
        assert not item["video"][:, 3 * H:].any()


def test_nonfinite_context_drops_only_its_row():
    rows = [{"sample_id": f"s{i}", "question_id": 0, "target_tokens": [3] * n} for i, n in enumerate((2, 3, 1))]
    tensors = {"target.h1": torch.zeros(6, 4), "prompt.target.h1": torch.arange(3.0)[:, None].expand(3, 4),
               "video.target.h1": torch.arange(6.0)[:, None].expand(6, 4).clone()}
    tensors["video.target.h1"][3, 1] = float("nan")                          # row 1's second video row
    kept, out, errors = drop_nonfinite(rows, tensors)
    assert [r["sample_id"] for r in kept] == ["s0", "s2"] and [e[0] for e in errors] == ["s1#0"]
    assert out["target.h1"].shape[0] == 3 and out["prompt.target.h1"][:, 0].tolist() == [0.0, 2.0]
    assert out["video.target.h1"][:, 0].tolist() == [0.0, 1.0, 4.0, 5.0]


def test_alignment_of_the_prompt_row_and_the_video_summary():
    assert prompt_row_position(10) == 8 and prompt_row_position(10, pad=3) == 11
    ids = torch.tensor([0, 0, 1, 5, 5, 5, 5, 5, 5, 9, 8])                   # 2 pads, BOS, 6 video, question
    hidden = torch.arange(11.0)[:, None].expand(11, 2)
    assert video_summary(hidden, ids, 5, 2)[:, 0].tolist() == [4.0, 7.0]     # positions 3-5 and 6-8


def context_batch(m, store_dir):
    store = FeatureStore(store_dir)
    return store, Eagle3Type().batch(m, store, store.rows)


def test_first_round_proposes_offline_and_online(tmp_path):
    """A drafter whose fc passes the high layer straight to the target's head: the prompt row (which holds
    4 lm_head[r_0]) makes it propose r_0 at p = 0, offline (chain_runs) and in `propose`."""
    store, _ = context_batch(drafter(), make_store(tmp_path / "s"))
    m = drafter()
    head = target_head()
    with torch.no_grad():
        m.embed_tokens.weight.normal_()
        m.lm_head.weight.copy_(head[m.d2t + torch.arange(16)])
        m.fc.weight.zero_()
        m.fc.weight[:, 2 * H:] = torch.eye(H)
        m.layers[0].self_attn.o_proj.weight.zero_()
        m.layers[0].mlp.down_proj.weight.zero_()
    _, batch = context_batch(m, store.root)
    runs = m.chain_runs(batch, 3)
    assert (runs.cap[:, 0] == 3).all()
    in_vocab = [i for i, r in enumerate(store.rows) if m.t2d[r.target_tokens[0]]]
    assert in_vocab and (runs.run[in_vocab, 0] >= 1).all()
    for i in in_vocab:
        c = PromptRows(batch["feats"][i], batch["prompt"][i], int(batch["prompt_token"][i]), batch["video"][i])
        assert m.propose(c, [], 3)[0][0] == store.rows[i].target_tokens[0]
        assert len(m.propose(c, [], 3)[0]) == 3
    plain = Eagle3Drafter(Eagle3Config(**{**m.config.to_dict(), "prompt_context": False}))
    assert plain.propose(batch["feats"][0], [], 3) == ([], None)           # without context: nothing


@pytest.mark.parametrize("source", ["target", "both"])
def test_batched_chain_runs_equal_round_by_round_with_context(source):
    m = drafter(1, source)
    g = torch.Generator().manual_seed(1)
    width, lengths = m.config.fc_in_features, (6, 11, 2, 9)
    contexts = [PromptRows(torch.randn(n, width, generator=g).bfloat16(), torch.randn(width, generator=g).bfloat16(),
                           int(torch.randint(3, V, (1,), generator=g)),
                           torch.randn(VIDEO_ROWS, width, generator=g).bfloat16()) for n in lengths]
    responses = responses_near(lambda b, r: m.propose(contexts[b], r, 1)[0][0], lengths, seed=3)
    batch = {"tokens": pad([torch.tensor(r) for r in responses]), "length": torch.tensor(lengths),
             "feats": pad([c.rows for c in contexts]), "prompt": torch.stack([c.prompt for c in contexts]),
             "prompt_token": torch.tensor([c.token for c in contexts]),
             "video": torch.stack([c.video for c in contexts])}
    assert_same_rounds(m, contexts, responses, batch)
    runs = m.chain_runs(batch, max(GAMMAS))
    for b, r in enumerate(responses):
        first = simulate_greedy(r, lambda p, g, c=contexts[b], r=r: m.propose(c, r[:p], g)[0], 3)[0]
        assert first.proposed > 0 and rounds_from_runs(*runs.row(b, len(r)), len(r), 3)[0] == first


def test_store_without_context_is_refused_in_one_line(tmp_path):
    """A version-1 store (no context) still loads; a drafter that reads the context refuses it, naming the
    store and the command that writes one; with prompt_context=false it trains."""
    root = make_store(tmp_path / "old", context=False)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    store = FeatureStore(root)
    assert store.context_spec is None and store.hidden(store.rows[0], "target.h1").shape[1] == H
    cfg = train_config(root, tmp_path / "run", *TINY_EAGLE3)
    with pytest.raises(StoreMismatch) as e:
        Eagle3Type().configure(dict(cfg.adapter), store, "train")
    msg = str(e.value)
    assert "\n" not in msg and str(root) in msg and "specalign extract" in msg and "prompt_context=false" in msg
    with pytest.raises(StoreMismatch, match="specalign extract"):
        Eagle3Type().check_store(drafter(), store)
    off = Eagle3Type().configure({**dict(cfg.adapter), "prompt_context": False}, store, "train")
    assert not off.prompt_context


def test_resume_never_mixes_rows_with_and_without_context(tmp_path):
    root = make_store(tmp_path / "s", context=False)
    manifest = json.loads((root / "manifest.json").read_text())
    with pytest.raises(StoreMismatch, match="context"):
        StoreWriter(root, {**{k: manifest[k] for k in ("kind", "target", "draft", "layers", "dtype", "prompts",
                                                       "generation")}, "context": {"features": NAMES}})
