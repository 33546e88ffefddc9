"""The hand-written generator against transformers' model.generate on a tiny random-init Qwen2."""
import types

import torch

import hintsd


class ByteTok:
    """Just enough tokenizer for decode(): ids are bytes; 255 is EOS, 0 is pad."""
    eos_token_id, pad_token_id, unk_token_id = 255, 0, None

    def decode(self, ids):
        return bytes(i for i in ids if i < 255).decode("latin-1")

    def convert_tokens_to_ids(self, t):
        return None


def reference(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=255,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_greedy_matches_model_generate_rows_of_different_lengths(tiny):
    prompts = [[5, 17, 99, 3, 44, 1, 2], [7, 8], [200, 13, 13, 13, 60]]
    got = hintsd.generate(tiny, ByteTok(), prompts, max_new_tokens=12, temperature=0.0)
    for p, c in zip(prompts, got):
        assert c.tokens == reference(tiny, p, 12)  # token for token, stopping where generate stops


def test_shared_prompt_is_prefilled_once_and_expanded(tiny):
    prompts = [[9, 10, 11]] * 4 + [[1, 2]]
    got = hintsd.generate(tiny, ByteTok(), prompts, max_new_tokens=6, temperature=0.0)
    assert got[0].tokens == got[3].tokens == reference(tiny, [9, 10, 11], 6)
    assert got[4].tokens == reference(tiny, [1, 2], 6)


def test_logprobs_are_temperature_one_logprobs_of_the_sampled_tokens(tiny):
    p = [4, 5, 6]
    c = hintsd.generate(tiny, ByteTok(), [p], max_new_tokens=5, temperature=0.7, top_p=0.9, seed=1)[0]
    ids = torch.tensor([p + c.tokens])
    logp = torch.log_softmax(tiny(ids).logits[0].float(), -1)
    ref = [logp[len(p) - 1 + i, t].item() for i, t in enumerate(c.tokens)]
    assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(ref), atol=1e-4)


def test_sampling_is_seeded_and_varies_with_seed(tiny):
    run = lambda s: [c.tokens for c in hintsd.generate(tiny, ByteTok(), [[4, 5]] * 4, 8, 1.0, 1.0, seed=s)]
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(hintsd.sample(logits, 1.0, 0.8, g)[0]) for _ in range(200)}
    assert seen == {0, 1}


def test_stop_string_and_length_stops(tiny):
    tok = ByteTok()
    free = hintsd.generate(tiny, tok, [[5, 6]], max_new_tokens=10)[0]
    assert free.stop in ("eos", "length") and len(free.tokens) <= 10
    stop = tok.decode(free.tokens[:3])  # a stop string that the greedy continuation is known to produce
    cut = hintsd.generate(tiny, tok, [[5, 6]], max_new_tokens=10, stop_strings=[stop])[0]
    assert cut.stop == "stop_string" and cut.tokens == free.tokens[:3]


def test_eos_stops_a_row_and_is_kept_as_its_last_token(tiny):
    free = hintsd.generate(tiny, ByteTok(), [[5, 6]], max_new_tokens=10)[0]
    tok = ByteTok()
    tok.eos_token_id = free.tokens[2]
    cut = hintsd.generate(tiny, tok, [[5, 6]], max_new_tokens=10)[0]
    n = free.tokens.index(free.tokens[2]) + 1
    assert cut.stop == "eos" and cut.tokens == free.tokens[:n]
