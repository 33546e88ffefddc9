"""The real embedded model (Qwen2.5-Coder-0.5B-Instruct) end to end: greedy generation token-identical to
model.generate, real BFCL rollouts through the real backends and the official checker under both action protocols,
then replay verification's sampled tries, and one HINT-SD update with ground-truth oracle feedback."""
import copy
import gc

import pytest
import torch

import envs
import hintsd
import prompts

SEED = 0  # of the sampled tries in the --verify-samples test


@pytest.fixture(scope="module")
def embedded(embedded_dir):
    model, tok = hintsd.load_model(embedded_dir)  # the default dtype: bf16 where the CPU has AMX or AVX512-BF16
    yield model, tok
    del model
    gc.collect()  # the 2 GB model leaves with this module


def test_embedded_greedy_equals_model_generate(embedded):
    model, tok = embedded
    chats = [[{"role": "user", "content": "Write a Python function that reverses a string."}],
             [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}]]
    ids = [prompts.prompt_ids(tok, c, None)[0] for c in chats]
    got = hintsd.generate(model, tok, ids, max_new_tokens=24)
    for p, c in zip(ids, got):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=24, do_sample=False, eos_token_id=hintsd.eos_ids(tok, model),
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert c.tokens == ref
    assert got[1].stop == "eos" and len(got[1].tokens) < 24  # the one-word answer stops early, its EOS kept


@pytest.fixture(scope="module")
def rollouts(embedded):
    """Two real rollouts under each action protocol, on the train task with the shortest prompt (2.2k tokens)."""
    model, tok = embedded
    task = envs.load_tasks("bfcl", "train", 1)  # the task cut to its first user turn
    task = next(t for t in task if t["id"] == "multi_turn_base_105")
    cfg = hintsd.SamplingConfig(max_new_tokens=40, temperature=0.6, max_len=8192)
    return task, {p: hintsd.rollout(model, tok, [envs.make_env(task, max_steps=2, protocol=p) for _ in range(2)], cfg,
                                    [0, 1]) for p in envs.ACTION_PROTOCOLS}


@pytest.mark.parametrize("protocol", envs.ACTION_PROTOCOLS)
def test_embedded_model_plays_real_bfcl_episodes(embedded, rollouts, protocol):
    model, tok = embedded
    task, by_protocol = rollouts
    trajs = by_protocol[protocol]
    for t in trajs:
        assert t.reward in (0.0, 1.0) and t.status in ("completed", "max_steps") and 1 <= len(t.steps) <= 2
        for s in t.steps:
            assert tok.decode(t.tokens[s.start:s.end]) in (s.text + "<|im_end|>", s.text)
            assert s.logprobs and len(s.logprobs) == s.end - s.start
    assert any(s.output for t in trajs for s in t.steps)  # the model really talks to the environment
    if protocol == "authors":  # its system prompt is the authors' <tools> block, nothing else
        assert trajs[0].messages[0]["content"].startswith("\n\n# Tools\n")
    # the tools the chat template got travel with the trajectory (the analyzer's view lists them): friendly only
    assert trajs[0].tools == (envs.make_env(task).tools if protocol == "friendly" else [])
    assert (trajs[0].tools != []) == (protocol == "friendly")


def test_embedded_verify_samples_keep_the_first_sampled_call_that_replays_cleanly(embedded, rollouts):
    """--verify-samples 4 with the real model: at the oracle's target of a failed rollout, the student's text made the
    teacher's greedy action (so replay says "same"), 3 actions are sampled at temperature 1; the first that calls a
    function and replays without an error keeps the target, quoted after its feedback."""
    model, tok = embedded
    task, by_protocol = rollouts
    trajs = copy.deepcopy(by_protocol["friendly"])
    h = hintsd.select_targets(model, tok, trajs, hintsd.AnalyzerConfig("oracle"), "multi", "bfcl", {},
                              {task["id"]: task}, "json", "friendly", 0)
    tg = h.targets[0]
    t, s = trajs[tg.traj], trajs[tg.traj].steps[tg.step]
    ctx = t.tokens[:s.header] + prompts.feedback_ids(tok, tg.feedback) + t.tokens[s.header:s.start]
    text = lambda out: tok.decode(out.tokens[:-1] if out.stop == "eos" else out.tokens)  # noqa: E731
    s.text = text(hintsd.generate(model, tok, [ctx], 40)[0])
    args = (model, tok, trajs, [tg], None, {task["id"]: task}, 40, "json", "friendly", 2)
    assert hintsd.verify_targets(*args) == ([], {"same": 1})
    earlier = [x.text for x in t.steps[:tg.step]]
    tries = [text(o) for o in hintsd.generate(model, tok, [ctx] * 3, 40, 1.0, 1.0, SEED)]
    good = [a for a in tries if envs.parse_calls(a, "json")[0]
            and envs.correction_problem(task, earlier, a, s.text, "json", 2) is None]
    assert good, f"no sampled try passes, the test would check nothing: {tries}"
    kept, dropped = hintsd.verify_targets(*args, samples=4, seed=SEED)
    assert kept == [hintsd.Target(tg.traj, tg.step, tg.feedback.strip() + hintsd.VERIFIED + good[0])] and not dropped


def test_embedded_model_one_hintsd_update_with_oracle_feedback(embedded, rollouts):
    model, tok = embedded
    task, by_protocol = rollouts
    trajs = by_protocol["authors"]
    h = hintsd.select_targets(model, tok, trajs, hintsd.AnalyzerConfig("oracle"), "multi", "bfcl", {},
                              {task["id"]: task}, "json", "authors", 0)
    assert h.targets and all(trajs[tg.traj].reward < 1.0 for tg in h.targets)
    params = hintsd.trainable_params(model, 8, 16)  # the last test of the module: LoRA on the loaded model itself
    sig = hintsd.Signal(targets=h.targets)
    total = hintsd.token_totals(trajs, [[0, 1]], sig, tok, 8192)
    sums = hintsd.update(model, tok, trajs, [[0, 1]], sig, hintsd.Shadow(params), hintsd.LossConfig(grad_ckpt="on"),
                         8192, 1, total)
    steps = [trajs[tg.traj].steps[tg.step] for tg in h.targets]
    assert sums.kl_tokens == sum(s.end - s.start for s in steps) == total[0]
    assert sums.kl > 0 and torch.isfinite(torch.tensor(sums.kl))  # the feedback changes the teacher
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
