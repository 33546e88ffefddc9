"""The hand-written generator (static KV cache with per-row lengths) against transformers' model.generate and a
fresh forward, on a tiny random-init Qwen2."""
import torch

import envs
import hintsd
import prompts


class ByteTok:
    """Just enough tokenizer for generate(): ids are bytes; 255 is EOS, 0 is pad."""
    eos_token_id, pad_token_id, unk_token_id = 255, 0, None

    def decode(self, ids, **kw):
        return bytes(i for i in ids if i < 255).decode("latin-1")

    def convert_tokens_to_ids(self, t):
        return None


def reference(model, prompt, n, eos=255):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_greedy_matches_model_generate_rows_of_different_lengths(tiny):
    prompts = [[5, 17, 99, 3, 44, 1, 2], [7, 8], [200, 13, 13, 13, 60]]
    got = hintsd.generate(tiny, ByteTok(), prompts, max_new_tokens=12)
    for p, c in zip(prompts, got):
        assert c.tokens == reference(tiny, p, 12) and c.stop == "length"


def test_rows_that_stop_early_match_generate_and_keep_their_eos(tiny):
    free = hintsd.generate(tiny, ByteTok(), [[5, 6], [9, 10, 11]], max_new_tokens=10)
    tok = ByteTok()
    tok.eos_token_id = free[0].tokens[2]  # row 0 now stops at its third token; row 1 goes on (or stops later)
    got = hintsd.generate(tiny, tok, [[5, 6], [9, 10, 11]], max_new_tokens=10)
    for p, c in zip([[5, 6], [9, 10, 11]], got):
        want = reference(tiny, p, 10, eos=tok.eos_token_id)
        assert c.tokens == want
        assert c.stop == ("eos" if want[-1] == tok.eos_token_id else "length")
    assert got[0].stop == "eos" and got[0].tokens[-1] == tok.eos_token_id and len(got[0].tokens) <= 3


def test_shared_prompt_is_prefilled_once_and_expanded(tiny):
    prompts = [[9, 10, 11]] * 4 + [[1, 2]]
    got = hintsd.generate(tiny, ByteTok(), prompts, max_new_tokens=6)
    assert got[0].tokens == got[3].tokens == reference(tiny, [9, 10, 11], 6)
    assert got[4].tokens == reference(tiny, [1, 2], 6)


def test_logprobs_are_temperature_one_logprobs_of_a_fresh_forward(tiny):
    p = [4, 5, 6]
    c = hintsd.generate(tiny, ByteTok(), [p], max_new_tokens=5, temperature=0.7, top_p=0.9, seed=1)[0]
    logp = torch.log_softmax(tiny(torch.tensor([p + c.tokens])).logits[0].float(), -1)
    ref = [logp[len(p) - 1 + i, t].item() for i, t in enumerate(c.tokens)]
    assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(ref), atol=1e-4)


def test_sampling_is_seeded_per_row_and_independent_of_the_batch(tiny):
    run = lambda prompts, s: [c.tokens for c in hintsd.generate(tiny, ByteTok(), prompts, 8, 1.0, 1.0, seed=s)]  # noqa
    assert run([[4, 5]] * 4, 3) == run([[4, 5]] * 4, 3)
    assert run([[4, 5]] * 4, 3) != run([[4, 5]] * 4, 4)
    rows = run([[4, 5]] * 4, 3)
    assert len(set(map(tuple, rows))) > 1  # the four rows draw differently
    # a row's draws depend on its own seed only: decode() with the same row seeds, different batch mates
    hintsd.use_kv_attention(tiny)
    def row_seeded(prompts, seeds):
        cache, logits = hintsd.start(tiny, prompts, 8)
        return [c.tokens for c in hintsd.decode_n_tokens(tiny, cache, logits, seeds, 8, 1.0, 1.0)]
    alone = row_seeded([[4, 5]], [77])[0]
    mixed = row_seeded([[9, 9, 9], [4, 5], [1]], [5, 77, 6])[1]
    assert alone == mixed
    # a batch cut into parts (first_row: where a part starts) samples as the whole batch does
    head = hintsd.generate(tiny, ByteTok(), [[4, 5]] * 3, 8, 1.0, 1.0, seed=3)
    tail = hintsd.generate(tiny, ByteTok(), [[4, 5]], 8, 1.0, 1.0, seed=3, first_row=3)
    assert [c.tokens for c in head + tail] == rows


def test_inverse_cdf_sampling_and_top_p_keep_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = [int(hintsd.sample(logits, 1.0, 0.8, torch.rand(1, generator=g))[0]) for _ in range(400)]
    assert set(draws) == {0, 1} and 0.55 < draws.count(0) / 400 < 0.8  # renormalised 2:1
    full = [int(hintsd.sample(logits, 1.0, 1.0, torch.rand(1, generator=g))[0]) for _ in range(2000)]
    assert abs(full.count(0) / 2000 - 0.6) < 0.05 and {2, 3} <= set(full)
    assert int(hintsd.sample(logits, 1.0, 1.0, torch.tensor([0.0]))[0]) == 0
    assert int(hintsd.sample(logits, 1.0, 1.0, torch.tensor([1.0 - 1e-7]))[0]) == 3  # never past the last token


def test_chunked_prefill_grown_and_compacted_cache_give_the_same_tokens(tiny, monkeypatch):
    prompts = [[5, 17, 99, 3, 44, 1, 2, 8, 8, 9, 10], [7, 8], [200, 13, 13, 13, 60]]
    want = [c.tokens for c in hintsd.generate(tiny, ByteTok(), prompts, max_new_tokens=10)]
    monkeypatch.setattr(hintsd, "PREFILL_CHUNK", 3)  # prompts prefilled three tokens at a time
    assert [c.tokens for c in hintsd.generate(tiny, ByteTok(), prompts, max_new_tokens=10)] == want
    hintsd.use_kv_attention(tiny)
    cache, logits = hintsd.start(tiny, prompts, 0)  # no room: decode() grows the buffers
    first_capacity = cache.capacity
    out = hintsd.decode_n_tokens(tiny, cache, logits, [0, 0, 0], 10)
    assert cache.capacity > first_capacity and [c.tokens for c in out] == want
    # drop row 1 and continue rows 0 and 2: the same as continuing them without compaction
    more = [[c.tokens[-1]] for c in out]
    a = hintsd.decode_n_tokens(tiny, cache, hintsd.prefill(tiny, cache, [[3, 4], [3, 4], [3, 4]]), [0] * 3, 5)
    cache2, _ = hintsd.start(tiny, [p + c.tokens for p, c in zip(prompts, out)], 0)
    cache2.keep([0, 2])
    b = hintsd.decode_n_tokens(tiny, cache2, hintsd.prefill(tiny, cache2, [[3, 4], [3, 4]]), [0, 0], 5)
    assert [a[0].tokens, a[2].tokens] == [b[0].tokens, b[1].tokens] and more


def test_inactive_rows_write_nothing(tiny):
    hintsd.use_kv_attention(tiny)
    cache, logits = hintsd.start(tiny, [[1, 2, 3], [4, 5]], 8)
    before = [k.clone() for k in cache.k]
    out = hintsd.decode_n_tokens(tiny, cache, logits, [0, 0], 4, active=torch.tensor([True, False]))
    assert cache.lengths.tolist() == [3 + 3, 2] and cache.owed == [[out[0].tokens[3]], []]  # the 4th token is owed
    for k, b in zip(cache.k, before):
        assert torch.equal(k[1, :, :cache.capacity], b[1, :, :cache.capacity])  # row 1 untouched (scratch aside)


def test_a_context_that_would_pass_max_len_is_stopped_and_counted(policy):
    model, tok = policy
    task = envs.load_tasks("bfcl", "train")[0]
    prompt_len = len(prompts.prompt_ids(tok, envs.make_env(task).reset(), envs.make_env(task).tools)[0])
    cfg = hintsd.SamplingConfig(max_new_tokens=8, temperature=1.0, max_len=prompt_len + 30)
    [t] = hintsd.rollout(model, tok, [envs.make_env(task, max_steps=10)], cfg, [0])
    assert t.status == "overflow" and len(t.tokens) + 8 <= cfg.max_len + 30
    assert t.reward == 0.0 and t.steps  # it played until the next action would not fit, then stopped
    cfg = hintsd.SamplingConfig(max_new_tokens=8, temperature=1.0, max_len=prompt_len)
    [t] = hintsd.rollout(model, tok, [envs.make_env(task, max_steps=10)], cfg, [0])
    assert t.status == "overflow" and not t.steps  # not even the first action fits


def test_cuda_graph_step_falls_back_to_the_eager_step_when_it_cannot_capture(tiny, capsys):
    """Off a GPU (or when a capture fails) CudaGraphs says so once and decodes eagerly, with the same tokens."""
    graphs = hintsd.CudaGraphs()
    hintsd.use_kv_attention(tiny)
    cache, logits = hintsd.start(tiny, [[5, 6, 7]], 4)
    tok = torch.tensor([8])
    got = graphs(tiny, cache, tok, torch.tensor([True]), cache.width(1))
    cache2, _ = hintsd.start(tiny, [[5, 6, 7]], 4)
    want = hintsd.decode_one_token(tiny, cache2, tok, torch.tensor([True]), cache2.width(1))
    assert torch.allclose(got, want) and not graphs.enabled and "CUDA graphs off" in capsys.readouterr().err
    assert cache.lengths.tolist() == cache2.lengths.tolist() == [4]


def test_shared_prefixes_are_prefilled_once_and_each_row_holds_its_own_prompt(tiny, monkeypatch):
    g = torch.Generator().manual_seed(3)
    head = torch.randint(1, 250, (20,), generator=g).tolist()
    a, b = head + [7, 8, 9, 10], head + [7, 8, 11]
    prompts = [a, b, head, a, head[:5] + [99], [3, 4]]  # a shared head, a prompt inside others, a pair, a stranger
    fed, real = [], hintsd.prefill
    monkeypatch.setattr(hintsd, "prefill", lambda m, c, chunks: fed.append(sum(map(len, chunks))) or real(m, c, chunks))
    got = hintsd.generate(tiny, ByteTok(), prompts, max_new_tokens=6)
    assert [c.tokens for c in got] == [reference(tiny, p, 6) for p in prompts]
    assert sum(fed) == len(hintsd.pack(prompts).ids)  # every token of the prefix tree once
