"""The baselines' losses and masks (SDPO, OpenClaw, GRPO, SFT) on real BFCL rollouts of the tiny Qwen2, and
rollouts with a replayed prefix and an inserted hint (the feedback-placement analysis)."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import envs
import hintsd
from conftest import lora_copy
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


def test_policy_gradient_uses_the_sampled_tokens_and_their_rollout_logprobs(policy, trajs):
    model, tok = policy
    model = copy.deepcopy(model)
    params = hintsd.trainable_params(model, 4, 8)
    # rollout logprobs (from the KV-cache sampler) match a fresh forward: the ratio starts at 1
    t = trajs[0]
    with torch.no_grad():
        [logits] = hintsd.packed_logits(model, [t.tokens], [[j - 1 for j in hintsd.action_tokens(t.steps)]], 0)
    ids = torch.tensor([t.tokens[j] for j in hintsd.action_tokens(t.steps)])
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, None])[:, 0]
    old = torch.tensor([x for s in t.steps for x in s.logprobs])
    assert lp.shape == old.shape and torch.allclose(lp, old, atol=1e-3)
    cfg = hintsd.LossConfig()
    zero = hintsd.Signal(advantages=[[0.0] * len(t.steps) for t in trajs])
    losses, sums = hintsd.task_loss(model, tok, trajs, [0, 1], zero, None, cfg, 1 << 20)
    assert losses is None and sums.pg_tokens == 0  # zero advantage: nothing to learn, nothing run
    sig = hintsd.Signal(advantages=[[1.0] * len(trajs[0].steps), [-1.0] * len(trajs[1].steps)])
    (_, pg, _), sums = hintsd.task_loss(model, tok, trajs, [0, 1], sig, None, cfg, 1 << 20)
    pg.backward()
    assert sums.pg_tokens == failed_tokens(trajs)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    # on-policy: the loss is -sum(A) over the tokens (ratio 1)
    want = -(sum(len(s.logprobs) for s in trajs[0].steps) - sum(len(s.logprobs) for s in trajs[1].steps))
    assert abs(sums.pg - want) < 1e-2
    # per-step advantages (OpenClaw's judge scores): only the steps with a nonzero score are run
    one = hintsd.Signal(advantages=[[0.0] * (len(trajs[0].steps) - 1) + [-1.0], [0.0] * len(trajs[1].steps)])
    _, sums = hintsd.task_loss(model, tok, trajs, [0, 1], one, None, cfg, 1 << 20)
    assert sums.pg_tokens == trajs[0].steps[-1].end - trajs[0].steps[-1].start


def test_grpo_and_distillation_normalisers(policy, trajs):
    """loss_weights: a token mean per task averaged over the step's tasks (the authors', a task without targets
    counting 0), or one token mean; PG over every sampled action token of the step."""
    model, tok = policy
    sig = hintsd.Signal(targets=[hintsd.Target(0, 0, "You should call ls.")],
                        advantages=[[1.0] * len(t.steps) for t in trajs])
    n0 = trajs[0].steps[0].end - trajs[0].steps[0].start
    groups = [[0], [1]]
    total = hintsd.token_totals(trajs, groups, sig, tok, 1 << 20)
    assert total[:2] == [n0, sum(len(s.logprobs) for t in trajs for s in t.steps)]
    w = [hintsd.loss_weights(n, 2, total, "task") for n in (n0, 0)]  # task 2 has no target
    assert w[0][0] == 1 / (2 * n0) and w[1][0] == 1.0  # (a KL weight without targets is never used)
    assert w[0][1] == w[1][1] == 1 / total[1]
    w = [hintsd.loss_weights(n, 2, total, "token") for n in (n0, 0)]
    assert w[0][0] == w[1][0] == 1 / n0


# ----------------------------------------------------------------------------- SDPO
def test_sdpo_places_feedback_before_the_first_action_and_masks_every_action_token(policy, trajs):
    model, tok = policy
    hindsight = [hintsd.Target(0, 1, "You should list files."), hintsd.Target(1, 0, "You should cd first.")]
    targets = hintsd.sdpo_targets(trajs, hindsight)
    assert [(tg.traj, tg.step) for tg in targets] == [(i, j) for i in (0, 1) for j in range(len(trajs[i].steps))]
    assert all(tg.at_step == 0 for tg in targets)
    sums = hintsd.measure(copy.deepcopy(model), tok, trajs, [[0, 1]], hintsd.Signal(targets), hintsd.LossConfig(),
                          1 << 20, {})
    assert sums.kl_tokens == failed_tokens(trajs)  # every action token of the failed rollouts
    # teacher = one full forward of prefix + feedback + the whole rollout, read at every action token
    t = trajs[0]
    ctxs, rows, served, _ = hintsd.teacher_contexts(tok, trajs, [tg for tg in targets if tg.traj == 0], 1 << 20)
    fb = prompts.feedback_ids(tok, "You should list files.")
    h0 = t.steps[0].header
    assert ctxs == [t.tokens[:h0] + fb + t.tokens[h0:t.steps[-1].end]] and len(served[0]) == len(t.steps)
    with torch.no_grad():
        got = hintsd.packed_logits(model, ctxs, rows, 1 << 20)[0]
        ref = model(torch.tensor(ctxs), logits_to_keep=torch.tensor(rows[0])).logits[0].float()
    assert torch.allclose(got, ref, atol=1e-4)
    assert rows[0] == [j + len(fb) - 1 for j in hintsd.action_tokens(t.steps)]


# ----------------------------------------------------------------------------- OpenClaw
def test_openclaw_judges_every_step_and_places_each_hint_at_its_own_step(policy, trajs, monkeypatch):
    model, tok = policy
    seen = []
    n = sum(len(t.steps) for t in trajs)
    answers = ['{"score": -1, "hint": "You should call ls."}', '{"score": 1, "hint": ""}', "no idea",
               '```json\n{"score": -1, "hint": "You should call pwd."}\n```'] * n

    def judge(model_, tok_, chats, max_new, *args, **kw):  # stands in for the model's answers
        seen.extend(chats)
        return answers[:len(chats)]
    monkeypatch.setattr(hintsd, "generate_texts", judge)
    targets, scores, raw, failures = hintsd.judge_steps(model, tok, trajs, 32, 0)
    pairs = [(i, j) for i, t in enumerate(trajs) for j in range(len(t.steps))]
    assert len(seen) == len(raw) == n                             # one judge call per assistant step
    for (i, j), chat in zip(pairs, seen):                        # each call reads that step's action and outcome
        s = trajs[i].steps[j]
        assert s.text.strip() in chat[1]["content"] or len(s.text) > 1400
        assert prompts.output_text(s).strip()[:200] in chat[1]["content"]
    hinted = [p for p, a in zip(pairs, answers) if '"hint": "You' in a]
    assert [(tg.traj, tg.step) for tg in targets] == hinted and all(tg.at_step is None for tg in targets)
    assert failures == sum(a == "no idea" for a in answers[:n])
    assert [x for s in scores for x in s] == [{"no idea": 0.0, '{"score": 1, "hint": ""}': 1.0}.get(a, -1.0)
                                              for a in answers[:n]]
    # each hint conditions the teacher of its own step only: feedback right before that action's header
    t, tg = trajs[targets[0].traj], targets[0]
    [ctx], _, _, _ = hintsd.teacher_contexts(tok, trajs, [tg], 1 << 20)
    s = t.steps[tg.step]
    assert ctx == t.tokens[:s.header] + prompts.feedback_ids(tok, tg.feedback) + t.tokens[s.header:s.end]


def test_step_requests_follow_the_turns(trajs):
    t = trajs[0]
    reqs = prompts.step_requests(t)
    first = next(m["content"] for m in t.messages if m["role"] == "user")
    for s, req in zip(t.steps, reqs):
        assert req == first if s.turn == 0 else req == prompts.output_text(t.steps[[x.turn for x in t.steps].index(
            s.turn) - 1])


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
    tok = policy[1]
    model, params = lora_copy(policy[0], 0.1)
    t = trajs[0]
    n = sum(s.end - s.start for s in t.steps)
    (_, _, ce), sums = hintsd.task_loss(model, tok, [t], [0], hintsd.Signal(ce=True), None, hintsd.LossConfig(),
                                        1 << 20)
    (ce / n).backward()
    mine = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    ids = torch.tensor([t.tokens[:t.steps[-1].end]])
    labels = torch.full_like(ids, -100)
    for s in t.steps:
        labels[0, s.start:s.end] = ids[0, s.start:s.end]
    keep = (labels[0, 1:] != -100).nonzero()[:, 0]  # logits only where a label is (a 152k vocab: 3 GB otherwise)
    ref = F.cross_entropy(model(ids, logits_to_keep=keep).logits[0].float(), labels[0, 1:][keep], ignore_index=-100)
    ref.backward()
    assert sums.ce_tokens == n and abs(sums.ce / n - float(ref.detach())) < 1e-4
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(mine, params))


@pytest.mark.parametrize("protocol", envs.ACTION_PROTOCOLS)
def test_ground_truth_replay_is_a_successful_rollout_without_the_model(policy, protocol):
    model, tok = policy
    task = envs.load_tasks("bfcl", "train")[0]
    env = envs.make_env(task, protocol=protocol)
    [t] = hintsd.sft_dataset(model, tok, [task], "json", protocol, 16384)
    assert t.reward == 1.0 and t.status == "completed"
    assert [s.text for s in t.steps] == env.ground_truth_actions() and all(not s.logprobs for s in t.steps)
    for s in t.steps:  # spans hold exactly the action ids; the rendered chat equals the ids
        assert tok.decode(t.tokens[s.start:s.end]) == s.text + "<|im_end|>"
    text, contents = prompts.render(tok, t.messages, env.tools, False)
    assert tok.decode(prompts.encode_rendered(tok, text, contents)).startswith(tok.decode(t.tokens))


def test_sft_dataset_adds_successful_external_trajectories_and_skips_other_tasks(policy, tmp_path, capsys):
    """(A malformed line is a parse error of --sft-data: tests/test_robustness.py.)"""
    model, tok = policy
    task = envs.load_tasks("bfcl", "train")[0]
    gt = envs.make_env(task).ground_truth_actions()
    f = tmp_path / "ext.jsonl"
    f.write_text("\n".join([json.dumps({"task_id": task["id"], "actions": gt}),                    # succeeds
                            json.dumps({"task_id": task["id"], "messages": [{"role": "assistant", "content": "hi"}]}),
                            json.dumps({"task_id": "nope", "actions": gt})]) + "\n")
    demos = hintsd.sft_dataset(model, tok, [task], "json", "friendly", 16384, str(f))
    assert len(demos) == 2 and all(d.reward == 1.0 for d in demos)  # the replay and the good external line
    assert "line 3: skipped (task 'nope' is not among this run's train tasks)" in capsys.readouterr().err


def test_rollout_with_replayed_prefix_and_hint(policy):
    model, tok = policy
    task = envs.load_tasks("bfcl", "train")[0]
    env = envs.make_env(task, max_steps=5)
    gt = env.ground_truth_actions()
    cfg = hintsd.SamplingConfig(max_new_tokens=8, temperature=1.0, max_len=16384)
    hint = "You should double-check the file name."
    [start, target] = hintsd.rollout(model, tok, [envs.make_env(task, max_steps=5) for _ in range(2)], cfg, [0, 1],
                                     forced=[[], gt[:2]], hints=[(0, hint), (2, hint)])
    fb = prompts.feedback_message(hint)
    # start: the hint is the message right after the task; target: right before the third action
    assert start.messages[2] == fb and start.steps[0].logprobs
    roles = [m for m in target.messages if m["role"] == "assistant" or m == fb]
    assert roles[2] == fb and [s.text for s in target.steps[:2]] == gt[:2]
    assert not target.steps[0].logprobs and len(target.steps) > 2 and target.steps[2].logprobs
    assert all(fb not in s.output for s in target.steps)  # the hint is ours, not what the environment said
    for t in (start, target):  # the token ids are the rendered chat, hint included
        text, contents = prompts.render(tok, t.messages, env.tools, False)
        assert tok.decode(prompts.encode_rendered(tok, text, contents)).startswith(tok.decode(t.tokens))


# ----------------------------------------------------------------------------- every method from the CLI
@pytest.mark.parametrize("method", ["sdpo", "openclaw", "grpo", "sft", "initial"])
def test_every_method_runs_one_step_from_the_cli(tiny_qwen, tmp_path, method):
    out = tmp_path / method
    hintsd.main(["--model", str(tiny_qwen), "--preset", "cpu", "--method", method, "--feedback",
                 "policy" if method == "openclaw" else "oracle", "--limit", "1", "--rollouts", "2", "--steps", "1",
                 "--tasks-per-step", "1", "--max-new-tokens", "6", "--max-env-steps", "3", "--analyzer-tokens", "8",
                 "--lora-rank", "4", "--lr", "1e-2", "--temperature", "1.0", "--after-check", "--out", str(out)])
    [row] = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert row["method"] == method and row["rollouts"] == (1 if method == "sft" else 2)
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
    if method == "sft":  # offline: the task's ground-truth replay, no rollouts
        assert row["success_rate"] is None and row["tokens_supervised"] > 0 and row["ce_after"] < row["ce"]
    if method == "initial":
        assert row["tokens_supervised"] == 0 and row["targets"] == 0


def test_cli_rejects_openclaw_without_a_judge(capsys):
    with pytest.raises(SystemExit) as e:
        hintsd.parse_args(["--method", "openclaw", "--feedback", "oracle"])
    assert e.value.code == 2 and "judge is the policy" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        hintsd.parse_args(["--method", "dpo"])
    assert e.value.code == 2 and "invalid choice: 'dpo'" in capsys.readouterr().err


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
    assert 1 <= pair["target_step"] <= pair["steps"] and pair["feedback"].startswith(("That call", "The request",
                                                                                       "Your call"))
    s = json.loads((out / "summary.json").read_text())
    assert s["pairs"] == 1 and s["success"] == {c: 100.0 * r[0] for c, r in pair["rewards"].items()}
    assert "| target - start |" in capsys.readouterr().out


# ----------------------------------------------------------------------------- analyzer answers that always parse
@pytest.mark.parametrize("n_steps", [1, 3, 12, 150])
def test_forced_answers_name_a_step_of_the_rollout(policy, n_steps):
    """--analyzer-forced: the JSON opening is given and the step number is drawn among the rollout's steps only (1..n,
    at most 99), from the analyzer's own distribution; the rest is the model's."""
    model, tok = policy
    chats = [[{"role": "user", "content": f"Which step failed? {i}"}] for i in range(6)]
    for variant, opening in (("multi", '{"failures": [{"step": '), ("single", '{"failure_step": ')):
        answers = hintsd.forced_answers(model, tok, chats, [n_steps] * 6, variant, 6, 1.0, 1.0, seed=n_steps)
        for a in answers:
            assert a.startswith(opening)
            step, rest = a[len(opening):].split(", ", 1)
            assert 1 <= int(step) <= min(n_steps, 99) and rest.startswith('"feedback": "')
        steps = {int(a[len(opening):].split(",")[0]) for a in answers}
        assert n_steps < 12 or len(steps) > 1  # sampled, not fixed (temperature 1)
    greedy = hintsd.forced_answers(model, tok, chats[:2], [3, 3], "multi", 4, 0.0, 1.0, seed=0)
    assert greedy == hintsd.forced_answers(model, tok, chats[:2], [3, 3], "multi", 4, 0.0, 1.0, seed=1)


def test_forced_answers_come_in_batches_of_eight_on_a_cpu_seeded_per_chat(policy):
    """A chat's answer depends on its own seed (seed, its index in the call), not on the batch it shares: the 10th of
    ten chats (the second batch on a CPU) is answered as when it is sent alone; no chat, no answer."""
    model, tok = policy
    chats = [[{"role": "user", "content": f"Which step failed? {i}"}] for i in range(10)]
    answers = hintsd.forced_answers(model, tok, chats, [3] * 10, "multi", 5, 1.0, 1.0, seed=4)
    alone = hintsd.forced_batch(model, tok, chats[9:], [3], "multi", 5, 1.0, 1.0, 4, None, None, 9)
    assert len(answers) == 10 and answers[9] == alone[0] and len(set(answers)) > 1
    assert hintsd.forced_answers(model, tok, [], [], "multi", 5, 1.0, 1.0, seed=4) == []


def test_tool_pick_opens_the_feedback_with_the_calibrated_best_tool(policy, trajs):
    """--analyzer-tool-pick: the forced feedback opens with TOOL_HEAD and the task's tool whose name is most likely
    there relative to the same view with the request blanked; checked against plain forwards of every name, one
    sequence at a time (no packing, no cache)."""
    model, tok = policy
    tasks_by_id = {t["id"]: t for t in envs.load_tasks("bfcl", "train")}
    cfg = hintsd.AnalyzerConfig("policy", "authors", "strict", 3, 0.0, 1.0, forced=True, tool_pick=True)
    h = hintsd.select_targets(model, tok, trajs, cfg, "multi", "bfcl", {}, tasks_by_id, "json", "friendly", 0)
    failed = [t for t in trajs if t.reward < 1.0 and t.steps]
    assert len(h.answers) == len(failed) and len(h.targets) == len(failed)  # every answer parses, one target each
    head = prompts.encode(tok, hintsd.TOOL_HEAD)
    for t, answer, tg in zip(failed, h.answers, h.targets):
        names = envs.bfcl_tool_names(tasks_by_id[t.task_id])
        picked = [n for n in names if tg.feedback.startswith(f'The agent should call the tool "{n}"')]
        assert len(picked) == 1, tg.feedback
        digits = [tok.convert_tokens_to_ids(d) for d in str(tg.step + 1)]
        after = prompts.encode(tok, '{"failures": [{"step": ') + digits + prompts.encode(tok, ', "feedback": "') + head

        def logp(chat, name):
            ids = prompts.prompt_ids(tok, chat, None)[0] + after
            c = prompts.encode(tok, name + '\\"')
            lp = model(input_ids=torch.tensor([ids + c])).logits[0, len(ids) - 1:-1].float().log_softmax(-1)
            return lp.gather(1, torch.tensor(c)[:, None]).sum().item()
        view = prompts.analyzer_messages(t, "bfcl", "multi", "authors")
        blank = prompts.analyzer_messages(prompts.blank_requests(t), "bfcl", "multi", "authors")
        assert "N/A" in blank[1]["content"] and blank != view
        score = {n: logp(view, n) - logp(blank, n) for n in names}
        assert picked[0] == max(score, key=score.get)


@pytest.mark.parametrize("argv,says", [(["--analyzer-tool-pick"], "needs --analyzer-forced"),
                                       (["--analyzer-tool-pick", "--analyzer-forced", "--bench", "appworld"],
                                        "needs BFCL"),
                                       (["--verify-samples", "4"], "needs --verify-targets")])
def test_tool_pick_and_verify_samples_refuse_without_what_they_need(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        hintsd.parse_args([*argv, "--print-config"])
    assert e.value.code == 2 and says in capsys.readouterr().err


# ----------------------------------------------------------------------------- corrections checked by replay
FUEL = '<tool_call>\n{"name": "displayCarStatus", "arguments": {"option": "fuel"}}\n</tool_call>'


@pytest.mark.parametrize("action,why", [
    (FUEL, None),                                                                     # runs cleanly
    ('<tool_call>\n{"name": "displayCarStatus", "arguments": {"option": "fuel"\n</tool_call>', "unparsed"),
    ('<tool_call>\n{"name": "get_fuel_level", "arguments": {}}\n</tool_call>', "unknown function"),
    ('<tool_call>\n{"name": "displayCarStatus", "arguments": {}}\n</tool_call>', "error"),  # a missing argument
    ('<tool_call>\n{"name": "startEngine", "arguments": {"ignitionMode": "START"}}\n</tool_call>', "error"),
    ("The fuel level is fine.", None),                                                # ends the turn: nothing wrong
    ('<tool_call>\n{"name": "lockDoors", "arguments": {"unlock": false}}\n</tool_call>', "same"),  # the student's
])
@pytest.mark.parametrize("protocol", envs.ACTION_PROTOCOLS)
def test_a_correction_is_checked_by_replaying_the_environment(action, why, protocol):
    task = envs.load_tasks("bfcl", "train", 1, ["multi_turn_base_93"])[0]
    student = '<tool_call>\n{"name": "lockDoors", "arguments": {"unlock": false}}\n</tool_call>'
    earlier = ['<tool_call>\n{"name": "get_current_speed", "arguments": {}}\n</tool_call>']
    assert envs.correction_problem(task, earlier, action, student, "json", 3, protocol) == why


def test_verify_targets_keeps_what_replays_cleanly_and_counts_the_rest(policy, trajs):
    model, tok = policy
    tasks_by_id = {t["id"]: t for t in envs.load_tasks("bfcl", "train")}
    targets = [hintsd.Target(i, j, "You should call ls.") for i, t in enumerate(trajs) for j in range(len(t.steps))]
    kept, dropped = hintsd.verify_targets(model, tok, trajs, targets, None, tasks_by_id, 12, "json", "friendly", 4)
    assert len(kept) + sum(dropped.values()) == len(targets) and set(dropped) <= set(envs.CORRECTION_PROBLEMS)
    # the same check by hand: the teacher's greedy action at each target, replayed
    for tg in targets:
        t, s = trajs[tg.traj], trajs[tg.traj].steps[tg.step]
        ctx = t.tokens[:s.header] + prompts.feedback_ids(tok, tg.feedback) + t.tokens[s.header:s.start]
        [out] = hintsd.generate(model, tok, [ctx], 12)
        text = tok.decode(out.tokens[:-1] if out.stop == "eos" else out.tokens)
        why = envs.correction_problem(tasks_by_id[t.task_id], [x.text for x in t.steps[:tg.step]], text, s.text,
                                      "json", 4, "friendly")
        assert (tg in kept) == (why is None)


def test_verify_targets_leaves_a_target_the_loss_will_skip_unreplayed(policy, trajs):
    """A target whose teacher context through its action passes max_len is not replayed (the loss skips it and counts
    it there: teacher_contexts), so it is kept as it is, whatever its replay would say; the others are judged as
    without the bound. (The longest target is made to fail replay: its student action is the teacher's own, "same".)"""
    model, tok = policy
    tasks_by_id = {t["id"]: t for t in envs.load_tasks("bfcl", "train")}
    trajs = copy.deepcopy(trajs)
    targets = [hintsd.Target(i, j, "You should call ls.") for i, t in enumerate(trajs) for j in range(len(t.steps))]
    lens = [len(c) for c in hintsd.teacher_contexts(tok, trajs, targets, 1 << 30)[0]]  # one per target, to its end
    views = [hintsd.teacher_view(tok, trajs[tg.traj], tg, trajs[tg.traj].steps[tg.step].start) for tg in targets]
    longest = lens.index(max(lens))
    trajs[targets[longest].traj].steps[targets[longest].step].text = hintsd.teacher_actions(
        model, tok, views, 0.0, None, 12)[longest]
    args = (model, tok, trajs, targets, None, tasks_by_id, 12, "json", "friendly", 4)
    kept, dropped = hintsd.verify_targets(*args)
    assert targets[longest] not in kept and dropped["same"] >= 1
    bound = max(lens) - 1
    long = [tg for tg, n in zip(targets, lens) if n > bound]
    kept_b, dropped_b = hintsd.verify_targets(*args, max_len=bound)
    assert hintsd.teacher_contexts(tok, trajs, long, bound)[3] == len(long)  # the loss skips them
    assert all(tg in kept_b for tg in long)
    assert [tg for tg in kept_b if tg not in long] == [tg for tg in kept if tg not in long]
    assert sum(dropped_b.values()) == sum(dropped.values()) - sum(tg not in kept for tg in long)


def test_verify_samples_need_a_call_that_replays_cleanly(policy, trajs):
    """--verify-samples 4 with the tiny random policy: a target whose greedy action fails replay (here: the student's
    own text is made the teacher's greedy action, "same") gets 3 actions sampled at temperature 1. They replay
    without an error (they call nothing), but a sampled try must call a function: the target is still dropped.
    (The kept case, with the embedded model: tests/test_e2e.py.)"""
    model, tok = policy
    tasks_by_id = {t["id"]: t for t in envs.load_tasks("bfcl", "train")}
    tg, t = hintsd.Target(0, 0, "You should call ls."), copy.deepcopy(trajs[0])
    s = t.steps[0]
    ctx = t.tokens[:s.header] + prompts.feedback_ids(tok, tg.feedback) + t.tokens[s.header:s.start]
    text = lambda out: tok.decode(out.tokens[:-1] if out.stop == "eos" else out.tokens)  # noqa: E731
    s.text = text(hintsd.generate(model, tok, [ctx], 12)[0])
    args = (model, tok, [t], [tg], None, tasks_by_id, 12, "json", "friendly", 4)
    assert hintsd.verify_targets(*args) == ([], {"same": 1})
    tries = [text(o) for o in hintsd.generate(model, tok, [ctx] * 3, 12, 1.0, 1.0, 7)]
    assert any(envs.correction_problem(tasks_by_id[t.task_id], [], a, s.text, "json", 4) is None for a in tries)
    assert not any(envs.parse_calls(a, "json")[0] for a in tries)
    assert hintsd.verify_targets(*args, samples=4, seed=7) == ([], {"same": 1})


def test_tool_choice_scores_each_name_as_a_plain_forward_would(policy, trajs):
    """bench/analyzer.py --tool-choice: each tool name's log-probability after the analyzer's view, from one packed
    forward, equals the sum over its tokens from a separate forward of the view followed by that name."""
    from bench import analyzer
    model, tok = policy
    t = trajs[0]
    view, names = analyzer.analyzer_view(tok, t, 0), [x["function"]["name"] for x in t.tools]
    assert len(names) > 3 and tok.decode(view).endswith('"feedback": "The agent should call the tool "')
    got = analyzer.tool_scores(model, tok, view, names)
    assert list(got) == names
    for name in names[:3]:
        tail = prompts.encode(tok, name + '"')
        with torch.no_grad():
            lp = model(torch.tensor([view + tail])).logits[0, len(view) - 1:-1].float().log_softmax(-1)
        assert got[name] == pytest.approx(lp.gather(1, torch.tensor(tail)[:, None]).sum().item(), abs=1e-3)


def test_follow_probe_scores_three_teacher_actions_per_rollout(policy, trajs, capsys):
    """bench/analyzer.py --follow: per rollout whose oracle names a function, the teacher's action with no feedback,
    with the tool's name, with the oracle's feedback; the table counts each over those rollouts."""
    from bench import analyzer
    model, tok = policy
    tasks_by_id = {t["id"]: t for t in envs.load_tasks("bfcl", "train")}
    named = [t for t in trajs if analyzer.oracle_of(tasks_by_id[t.task_id], [(s.turn, s.text) for s in t.steps])[1]]
    analyzer.follow(model, tok, trajs, tasks_by_id)
    out = capsys.readouterr().out
    assert named and f"{len(named)} rollouts where the oracle names a function" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| none", "| name", "| oracle"))]
    assert [r[0] for r in rows] == ["| none", "| name", "| oracle"]
    assert all(0 <= int(c.split()[0]) <= len(named) for r in rows for c in r[1:])


def test_judge_probe_ranks_the_right_call_among_tries_that_run(policy, trajs, capsys, monkeypatch):
    """bench/analyzer.py --judge: at the oracle's step, the oracle's right call beside the tries that pass replay and
    call another function, each run through the real environment and scored by the policy as the judge; a printed
    score equals log p(1) - log p(-1) from a plain forward of the judge's chat."""
    from bench import analyzer
    model, tok = policy
    tasks_by_id = {t["id"]: t for t in envs.load_tasks("bfcl", "train")}
    pwd = '<tool_call>\n{"name": "pwd", "arguments": {}}\n</tool_call>'  # runs anywhere in the file system
    monkeypatch.setattr(hintsd, "teacher_actions", lambda m, t, ctxs, *a, **k: [pwd] * len(ctxs))
    analyzer.judge(model, tok, trajs, tasks_by_id, samples=2, seed=0)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("  multi_turn")]
    assert f"{len(trajs)} rollouts where the oracle names a function; {len(rows)} with a try" in out
    assert rows and "the right call scored highest" in out
    t = trajs[0]
    found = envs.oracle_feedback(tasks_by_id[t.task_id], [(s.turn, s.text) for s in t.steps], "json", "friendly")
    step, right = found[0][0] - 1, found[0][1].partition("The right call is:")[2].strip()
    earlier = [s.text for s in t.steps[:step]]
    assert '"current_working_directory"' in analyzer.answer(tasks_by_id[t.task_id], earlier, pwd)
    chat = prompts.judge_messages(prompts.step_requests(t)[step], right,
                                  analyzer.answer(tasks_by_id[t.task_id], earlier, right))
    view = prompts.prompt_ids(tok, chat, None)[0] + prompts.encode(tok, '{"score": ')
    lp = []
    for tail in (prompts.encode(tok, "1"), prompts.encode(tok, "-1")):
        with torch.no_grad():
            logits = model(torch.tensor([view + tail])).logits[0, len(view) - 1:-1].float().log_softmax(-1)
        lp.append(logits.gather(1, torch.tensor(tail)[:, None]).sum().item())
    first = rows[0].split(": ", 1)[1].split("; ")
    name, scores = first[0].rsplit(" ", 1)
    assert name == analyzer.right_function(found[0][1]) and first[1].startswith("pwd ")
    assert float(scores.split("/")[0]) == pytest.approx(lp[0] - lp[1], abs=0.006)


def test_coverage_counts_the_right_function_among_the_first_k_tries(trajs, capsys):
    """bench/analyzer.py's coverage (printed by --judge): per k, the rollouts where one of the first k tries calls the
    oracle's function, and where one also runs; a call of it with an argument it does not take counts as a call that
    does not run, and a try after the k-th is not counted."""
    from bench import analyzer
    tasks_by_id = {t["id"]: t for t in envs.load_tasks("bfcl", "train")}
    rows = analyzer.oracle_rows(trajs, tasks_by_id)
    assert rows and all(fn != "pwd" for _, _, fn, _ in rows)
    call = '<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>'
    tries = []
    for i, step, fn, text in rows:
        right = text.partition("The right call is:")[2].strip()
        tries.append([call % ("pwd", "{}"), call % (fn, '{"no_such_argument": 1}'), right])
        earlier = [s.text for s in trajs[i].steps[:step]]
        assert envs.correction_problem(tasks_by_id[trajs[i].task_id], earlier, right, "", "json", 3) is None
    analyzer.coverage(rows, tries, trajs, tasks_by_id)
    out = capsys.readouterr().out
    n = len(rows)
    assert f"of {n} rollouts (calls it / also runs): k=1: 0 / 0; k=2: {n} / 0; k=3: {n} / {n}\n" in out
    assert f"per task, all 3 tries: {trajs[0].task_id.removeprefix('multi_turn_')} {n}/{n} of {n}" in out
