"""The position-alignment rule on a real (tiny) LLaMA: row i predicts response token i."""

import torch
from specalign.vlms.alignment import feature_positions, gather_rows, teacher_forced_inputs
from transformers import LlamaConfig, LlamaForCausalLM


def test_feature_positions_formula():
    assert feature_positions(5, 3).tolist() == [4, 5, 6]
    assert feature_positions(5, 3, pad=2).tolist() == [6, 7, 8]


def test_rows_predict_the_greedy_response_with_left_padding():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    prompts = [[1, 7, 8, 9, 10], [1, 11, 12]]
    responses = []
    for p in prompts:  # the model's own greedy response
        out = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        responses.append(out[0, len(p):].tolist())
    seqs = [teacher_forced_inputs(p, r) for p, r in zip(prompts, responses)]
    width = max(map(len, seqs))
    pads = [width - len(s) for s in seqs]
    ids = torch.tensor([[0] * pad + s for pad, s in zip(pads, seqs)])
    mask = torch.tensor([[0] * pad + [1] * len(s) for pad, s in zip(pads, seqs)])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    rows = gather_rows(out.hidden_states[-1], [len(p) for p in prompts], [len(r) for r in responses], pads)
    for b, r in enumerate(responses):
        pred = model.lm_head(rows[b]).argmax(-1).tolist()
        assert pred == r
        # off by one is detectably wrong
        shifted = gather_rows(out.hidden_states[-1][b:b + 1], [len(prompts[b]) + 1], [len(r) - 1], [pads[b]])[0]
        assert model.lm_head(shifted).argmax(-1).tolist() != r[:-1] or len(set(r)) == 1
