"""The baselines' losses and masks (SDPO, OpenClaw, GRPO, SFT) on real BFCL rollouts of the tiny Qwen2, and
rollouts with a replayed prefix and an inserted hint (the feedback-placement analysis)."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import envs
import hintsd
import prompts


def failed_tokens(trajs):
    return sum(s.end - s.start for t in trajs if t.reward < 1.0 for s in t.steps)


# ----------------------------------------------------------------------------- GRPO
def test_grpo_advantages_sum_to_zero_per_group():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    adv = hintsd.group_advantages(rewards, 4)
    for g in range(3):
        assert abs(sum(adv[4 * g: 4 * g + 4])) < 1e-9
    assert adv[4:8] == [0.0] * 4                          # all failed: no signal
    assert adv[0] > 0 > adv[1] and abs(adv[0] - 1.0) < 1e-5  # (1 - 0.5) / 0.5
    assert all(x > 0 for x, r in zip(adv[8:], rewards[8:]) if r == 1.0)


def test_clipped_pg_loss_gradient_and_clip():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.tensor([1.0, 1.0, 0.0])
    loss = hintsd.clipped_pg_loss(logp, logp.detach(), adv, mask)  # on-policy: ratio 1
    loss.backward()
    assert torch.allclose(loss, -(adv * mask).sum() / 2)
    assert torch.allclose(logp.grad, -adv * mask / 2)               # -A * grad log p, token mean
    # a ratio above 1 + eps with A > 0 is clipped: no gradient; with A < 0 it is not
    logp = torch.tensor([0.0, 0.0], requires_grad=True)
    old = torch.tensor([-1.0, -1.0])
    hintsd.clipped_pg_loss(logp, old, torch.tensor([1.0, -1.0]), torch.ones(2)).backward()
    assert logp.grad[0] == 0 and logp.grad[1] > 0


def test_pg_update_uses_the_sampled_tokens_and_their_rollout_logprobs(policy, trajs):
    model, tok = policy
    model = copy.deepcopy(model)
    params = hintsd.trainable_params(model, 4, 8)
    # rollout logprobs (from the KV-cache sampler) match a fresh forward: the ratio starts at 1
    t = trajs[0]
    with torch.no_grad():
        lp = hintsd.action_logprobs(model, t, t.steps)
    old = torch.tensor([x for s in t.steps for x in s.logprobs])
    assert lp.shape == old.shape and torch.allclose(lp, old, atol=1e-3)
    st = hintsd.new_stats()
    hintsd.pg_update(model, trajs, [[0.0] * len(t.steps) for t in trajs], st)
    assert st["pg_tokens"] == 0 and all(p.grad is None for p in params)  # zero advantage: nothing to learn
    hintsd.pg_update(model, trajs, [[1.0] * len(trajs[0].steps), [-1.0] * len(trajs[1].steps)], st)
    assert st["pg_tokens"] == failed_tokens(trajs)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    # per-step advantages (OpenClaw's judge scores): only the steps with a nonzero score are run
    st = hintsd.new_stats()
    hintsd.pg_update(model, trajs[:1], [[0.0] * (len(trajs[0].steps) - 1) + [-1.0]], st)
    assert st["pg_tokens"] == trajs[0].steps[-1].end - trajs[0].steps[-1].start


# ----------------------------------------------------------------------------- SDPO
def test_sdpo_places_feedback_before_the_first_action_and_masks_every_action_token(policy, trajs):
    model, tok = policy
    hindsight = [hintsd.Target(0, 1, "You should list files."), hintsd.Target(1, 0, "You should cd first.")]
    targets = hintsd.sdpo_targets(trajs, hindsight)
    assert [(tg.traj, tg.step) for tg in targets] == [(i, j) for i in (0, 1) for j in range(len(trajs[i].steps))]
    assert all(tg.at == 0 for tg in targets)
    st = hintsd.new_stats()
    hintsd.distill(copy.deepcopy(model), tok, trajs, targets, None, 1 << 20, None, st, backward=False)
    assert st["tokens"] == failed_tokens(trajs)  # the mask covers every action token of the failed rollouts
    # teacher = one full forward of prefix + feedback + the whole rollout, read at every action token
    t = trajs[0]
    fb = hintsd.feedback_ids(tok, "You should list files.")
    got = hintsd.teacher_logits(model, t, t.steps, [fb] * len(t.steps), at=[t.steps[0].header] * len(t.steps))
    h0 = t.steps[0].header
    ref = model(torch.tensor([t.tokens[:h0] + fb + t.tokens[h0:t.steps[-1].end]])).logits[0].float()
    want = torch.cat([ref[s.start + len(fb) - 1: s.end + len(fb) - 1] for s in t.steps])
    assert torch.allclose(torch.cat(got), want, atol=1e-4)
    naive = hintsd.teacher_logits(model, t, t.steps, [fb] * len(t.steps), False, [h0] * len(t.steps))
    assert torch.allclose(torch.cat(naive), want, atol=1e-4)


# ----------------------------------------------------------------------------- OpenClaw
def test_openclaw_judges_every_step_and_places_each_hint_at_its_own_step(policy, trajs, monkeypatch):
    model, tok = policy
    seen = []
    n = sum(len(t.steps) for t in trajs)
    answers = ['{"score": -1, "hint": "You should call ls."}', '{"score": 1, "hint": ""}', "no idea",
               '```json\n{"score": -1, "hint": "You should call pwd."}\n```'] * n

    def judge(model_, tok_, chats, max_new, desc):  # stands in for the model's greedy answers
        seen.extend(chats)
        return answers[:len(chats)]
    monkeypatch.setattr(hintsd, "generate_texts", judge)
    st = hintsd.new_stats()
    targets, scores = hintsd.judge_steps(model, tok, trajs, 32, st)
    pairs = [(i, j) for i, t in enumerate(trajs) for j in range(len(t.steps))]
    assert len(seen) == st["judge_calls"] == n                   # one judge call per assistant turn
    for (i, j), chat in zip(pairs, seen):                        # each call reads that turn's action and outcome
        assert trajs[i].steps[j].text.strip() in chat[1]["content"] or len(trajs[i].steps[j].text) > 1400
        assert hintsd.step_outputs(trajs[i].messages)[j].strip()[:200] in chat[1]["content"]
    hinted = [p for p, a in zip(pairs, answers) if '"hint": "You' in a]
    assert [(tg.traj, tg.step) for tg in targets] == hinted and all(tg.at is None for tg in targets)
    assert st["parse_failures"] == sum(a == "no idea" for a in answers[:n])
    assert [x for s in scores for x in s] == [{"no idea": 0.0, '{"score": 1, "hint": ""}': 1.0}.get(a, -1.0)
                                              for a in answers[:n]]
    # each hint conditions the teacher of its own turn only: feedback right before that action's header
    t, tg = trajs[targets[0].traj], targets[0]
    s, fb = t.steps[tg.step], hintsd.feedback_ids(tok, tg.feedback)
    got = hintsd.teacher_logits(model, t, [s], [fb])[0]
    ref = model(torch.tensor([t.tokens[:s.header] + fb + t.tokens[s.header:s.end]])).logits[0].float()
    assert torch.allclose(got, ref[s.start + len(fb) - 1: s.end + len(fb) - 1], atol=1e-4)


def test_judge_parser():
    assert prompts.parse_judgement('{"score": -1, "hint": "You should call ls."}') == (-1, "You should call ls.")
    assert prompts.parse_judgement('Sure.\n```json\n{"score": "+1"}\n```') == (1, "")
    assert prompts.parse_judgement("{'score': -1, 'hint': 'You should call cd.',}") == (-1, "You should call cd.")
    for bad in ("", "garbage", '{"score": 0}', '{"score": true}', '{"hint": "x"}', None, "{" * 10_000):
        assert prompts.parse_judgement(bad) is None
    chat = prompts.judge_messages("list files", "<tool_call>ls</tool_call>", "x" * 5000)
    assert "list files" in chat[1]["content"] and len(chat[1]["content"]) < 4000


# ----------------------------------------------------------------------------- SFT and replays
def test_sft_loss_is_cross_entropy_on_the_action_tokens(policy, trajs):
    model, tok = policy
    model = copy.deepcopy(model)
    params = hintsd.trainable_params(model, 4, 8)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    t = trajs[0]
    st = hintsd.new_stats()
    hintsd.sft_update(model, [t], st)
    mine = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    ids = torch.tensor([t.tokens[:t.steps[-1].end]])
    labels = torch.full_like(ids, -100)
    for s in t.steps:
        labels[0, s.start:s.end] = ids[0, s.start:s.end]
    ref = F.cross_entropy(model(ids).logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)
    ref.backward()
    assert st["tokens"] == sum(s.end - s.start for s in t.steps)
    assert abs(st["loss_sum"] / st["tokens"] - float(ref.detach())) < 1e-4
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(mine, params))


def test_ground_truth_replay_is_a_successful_rollout_without_the_model(policy):
    model, tok = policy
    task = envs.load_tasks("bfcl", "train")[0]
    env = envs.make_env(task)
    [t] = hintsd.ground_truth_replays(model, tok, [task], "json", 16384)
    assert t.reward == 1.0 and t.status == "done"
    assert [s.text for s in t.steps] == env.ground_truth_actions() and all(not s.logprobs for s in t.steps)
    for s in t.steps:  # spans hold exactly the action ids; the rendered chat equals the ids
        assert tok.decode(t.tokens[s.start:s.end]) == s.text + "<|im_end|>"
    assert hintsd.render(tok, t.messages, env.tools, False).startswith(tok.decode(t.tokens))


def test_rollout_with_replayed_prefix_and_hint(policy):
    model, tok = policy
    task = envs.load_tasks("bfcl", "train")[0]
    env = envs.make_env(task, max_steps=5)
    gt = env.ground_truth_actions()
    cfg = hintsd.SamplingConfig(max_new_tokens=8, temperature=1.0, max_len=16384)
    gen = torch.Generator().manual_seed(0)
    hint = "You should double-check the file name."
    [start, target] = hintsd.rollout(model, tok, [envs.make_env(task, max_steps=5) for _ in range(2)], cfg, gen,
                                     forced=[[], gt[:2]], hints=[(0, hint), (2, hint)])
    fb = prompts.feedback_message(hint)
    # start: the hint is the message right after the task; target: right before the third action
    assert start.messages[2] == fb and start.steps[0].logprobs
    roles = [m for m in target.messages if m["role"] == "assistant" or m == fb]
    assert roles[2] == fb and [s.text for s in target.steps[:2]] == gt[:2]
    assert not target.steps[0].logprobs and len(target.steps) > 2 and target.steps[2].logprobs
    for t in (start, target):  # the token ids are the rendered chat, hint included
        assert hintsd.render(tok, t.messages, env.tools, False).startswith(tok.decode(t.tokens))


# ----------------------------------------------------------------------------- every method from the CLI
@pytest.mark.parametrize("method", ["sdpo", "openclaw", "grpo", "sft", "initial"])
def test_every_method_runs_one_step_from_the_cli(tiny_qwen, tmp_path, method):
    out = tmp_path / method
    hintsd.main(["--model", str(tiny_qwen), "--method", method, "--feedback",
                 "policy" if method == "openclaw" else "oracle", "--limit", "1", "--rollouts", "2", "--steps", "1",
                 "--tasks-per-step", "1", "--max-new-tokens", "6", "--max-env-steps", "3", "--analyzer-tokens", "8",
                 "--lora-rank", "4", "--lr", "1e-2", "--temperature", "1.0", "--after-check", "--out", str(out)])
    [row] = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert row["method"] == method and row["rollouts"] == 2
    assert {"time_rollout", "time_feedback", "time_update", "peak_mem_gb", "tokens_supervised"} <= row.keys()
    if method == "sdpo":  # oracle hindsight on failed rollouts: every action token of them
        [rl] = [json.loads(x) for x in open(out / "rollouts.jsonl")]
        failed = [r for r in rl["rollouts"] if r["reward"] < 1.0]
        assert row["tokens_supervised"] == sum(s["end"] - s["start"] for r in failed for s in r["steps"]) > 0
    if method == "openclaw":
        assert row["judge_calls"] == sum(len(r["steps"]) for r in
                                         json.loads(open(out / "rollouts.jsonl").readline())["rollouts"])
        assert row["judge_positive"] + row["judge_negative"] + row["parse_failures"] == row["judge_calls"]
    if method == "grpo":
        assert row["advantages"] == [0.0, 0.0] and row["tokens_supervised"] == 0  # both failed: no update
    if method == "sft":
        assert row["sft_ground_truth"] == 1 and row["tokens_supervised"] > 0 and row["ce_after"] < row["ce"]
    if method == "initial":
        assert row["tokens_supervised"] == 0 and row["targets"] == 0


def test_cli_rejects_openclaw_without_a_judge(capsys):
    with pytest.raises(SystemExit):
        hintsd.parse_args(["--method", "openclaw", "--feedback", "oracle"])
    with pytest.raises(SystemExit):
        hintsd.parse_args(["--method", "dpo"])
    assert "judge is the policy" in capsys.readouterr().err


def test_placement_analysis_runs_paired_conditions(tiny_qwen, tmp_path, monkeypatch, capsys):
    import sys
    from bench import placement  # the repo root is on sys.path (conftest)
    out = tmp_path / "placement"
    monkeypatch.setattr(sys, "argv", ["placement.py", "--model", str(tiny_qwen), "--split", "train", "--limit", "1",
                                      "--n", "1", "--feedback", "oracle", "--max-new-tokens", "6", "--max-env-steps",
                                      "3", "--temperature", "1.0", "--out", str(out)])
    placement.main()
    [pair] = [json.loads(x) for x in open(out / "pairs.jsonl")]
    assert {c: len(r) for c, r in pair["rewards"].items()} == {c: 1 for c in placement.CONDITIONS}
    s = json.loads((out / "summary.json").read_text())
    assert s["pairs"] == 1 and s["target_minus_start"] == s["gain_target"] - s["gain_start"]
    assert "| target - start |" in capsys.readouterr().out
