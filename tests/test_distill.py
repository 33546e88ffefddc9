"""Targeted self-distillation on real BFCL rollouts of a tiny random-init Qwen2 with the real Qwen tokenizer:
token ids and masks, teacher contexts, packed forwards (shared prefixes once) against plain forwards, the loss
and its gradient, resume, full fine-tuning."""
import copy
import json

import pytest
import torch

import envs
import hintsd
from conftest import lora_copy
import prompts


def test_rollout_keeps_exact_ids_and_spans_decode_to_the_actions(policy, trajs):
    model, tok = policy
    for t in trajs:
        assert t.status in ("completed", "max_steps") and t.reward == 0.0 and 1 <= len(t.steps) <= 4
        for s in t.steps:
            assert tok.decode(t.tokens[s.header:s.start]) == "<|im_start|>assistant\n"  # header excluded from mask
            ids = t.tokens[s.start:s.end]
            assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") or len(ids) == 12
            assert tok.decode(ids[:-1] if ids[-1] in hintsd.eos_ids(tok, model) else ids) == s.text
        # the ids are what the policy saw: the rendered final chat is the same text (prompt + actions + outputs)
        text, contents = prompts.render(tok, t.messages, envs.make_env(envs.load_tasks("bfcl", "train")[0]).tools,
                                        False)
        assert tok.decode(prompts.encode_rendered(tok, text, contents)).startswith(tok.decode(t.tokens[:t.steps[-1].end]))


def test_action_tokens_are_exactly_the_sampled_ids(trajs):
    t = trajs[0]
    toks = hintsd.action_tokens(t.steps)
    assert toks == [i for s in t.steps for i in range(s.start, s.end)]
    assert [t.tokens[i] for i in hintsd.action_tokens(t.steps[:1])] == t.tokens[t.steps[0].start:t.steps[0].end]


def test_teacher_context_inserts_one_feedback_message_before_the_action(policy, trajs):
    model, tok = policy
    t = trajs[0]
    tg = hintsd.Target(0, len(t.steps) - 1, "You should call ls first.")
    [ctx], [rows], [served], skipped = hintsd.teacher_contexts(tok, trajs, [tg], 1 << 20)
    s = t.steps[-1]
    want = (tok.decode(t.tokens[:s.header]) + "<|im_start|>user\n" + prompts.feedback_message(tg.feedback)["content"]
            + "<|im_end|>\n<|im_start|>assistant\n" + tok.decode(t.tokens[s.start:s.end]))
    assert tok.decode(ctx) == want and served == [tg] and skipped == 0
    n_fb = len(ctx) - s.end
    assert [ctx[r + 1] for r in rows] == t.tokens[s.start:s.end] and rows[0] == s.start + n_fb - 1


def test_packing_merges_shared_prefixes_and_orders_depth_first():
    p = hintsd.pack([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 6], [7]])
    assert p.ids == [1, 2, 3, 4, 6, 5, 7] and p.pos == [0, 1, 2, 3, 3, 2, 0]
    assert p.end == [6, 6, 5, 4, 5, 6, 7]
    assert [[p.ids[i] for i in w] for w in p.where] == [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 6], [7]]
    assert hintsd.pack_groups([[1] * 10, [1] * 9 + [2], [3] * 10], 12) == [[0, 1], [2]]
    assert hintsd.pack_groups([[1] * 10, [1] * 10], 0) == [[0], [1]]


def test_tree_blocks_skip_later_tokens_and_other_branches():
    # pack([[1, 2, 3, 4], [1, 2, 5]]): ids 1 2 3 4 5; token 5 (index 4) sees 1, 2 and itself, not the branch 3 4
    mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]).bool()
    blocks = hintsd.tree_blocks(mask, 2)
    assert [(r.start, c.tolist()) for r, c, _ in blocks] == [(0, [0, 1]), (2, [0, 1, 2, 3]), (4, [0, 1, 4])]
    assert all(torch.equal(m[0, 0], mask[r][:, c]) for r, c, m in blocks)
    [(rows, cols, m)] = hintsd.tree_blocks(mask, None)
    assert torch.equal(m[0, 0], mask) and rows == cols == slice(None)


def test_packed_logits_equal_separate_forwards(policy, trajs):
    model, tok = policy
    seqs = [t.tokens[:t.steps[-1].end] for t in trajs] + [trajs[0].tokens[:trajs[0].steps[0].end]]
    rows = [[s.start - 1 for s in t.steps] for t in trajs] + [[trajs[0].steps[0].start - 1]]
    with torch.no_grad():
        got = hintsd.packed_logits(model, seqs, rows, 1 << 20)
        assert len(hintsd.pack(seqs).ids) < sum(map(len, seqs)) - 1000  # the prompt is shared
        for seq, r, g in zip(seqs, rows, got):
            ref = model(torch.tensor([seq]), logits_to_keep=torch.tensor(r)).logits[0].float()
            assert torch.allclose(g, ref, atol=1e-4)
        unpacked = hintsd.packed_logits(model, seqs, rows, 0)  # one sequence per forward
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, unpacked))


@pytest.mark.parametrize("chunk", [None, 5])
def test_packed_gradient_equals_the_sum_of_separate_passes(tiny, chunk, monkeypatch):
    """Shared-prefix passes are exact: the gradient of a packed forward equals the sum of the gradients of the
    sequences run one at a time (float64 model; Qwen2's RMSNorm computes in float32, hence float32 tolerance), with
    the packed attention in one call (a GPU's) or in pieces of 5 queries (tree_blocks)."""
    monkeypatch.setitem(hintsd.PACK_QUERY_CHUNK, "cpu", chunk)
    model, params = lora_copy(tiny, 0.3)
    model.double()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 255, (40,), generator=g).tolist()
    seqs = [prefix + torch.randint(0, 255, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    rows = [list(range(38, len(s) - 1)) for s in seqs]
    target = torch.randn(sum(map(len, rows)), 256, generator=g, dtype=torch.float64)
    model.train()

    def grads(max_tokens):
        for p in params:
            p.grad = None
        logits = torch.cat(hintsd.packed_logits(model, seqs, rows, max_tokens, ckpt="off"))
        (logits.double() * target).sum().backward()
        return [p.grad.clone() for p in params]
    packed, separate = grads(1 << 20), grads(0)
    assert all((a - b).abs().max() <= 1e-6 * b.abs().max() for a, b in zip(packed, separate))
    assert any(a.abs().sum() > 0 for a in packed)


def test_task_loss_moves_the_student_towards_the_teacher_and_skips_overflow(policy, trajs):
    model, tok = policy
    model = copy.deepcopy(model)
    params = hintsd.trainable_params(model, 4, 8)
    ema = hintsd.Shadow(params)
    g = torch.Generator().manual_seed(0)
    for v in ema.values:  # a teacher that really differs from the student, so there is something to learn
        v.add_(torch.randn(v.shape, generator=g) * 0.5)
    opt = torch.optim.AdamW(params, lr=1e-2)
    sig = hintsd.Signal(targets=[hintsd.Target(0, 0, "You should list the files first.")])
    cfg = hintsd.LossConfig(topk=None, norm="token")
    kl = []
    for _ in range(4):
        opt.zero_grad()
        total = hintsd.token_totals(trajs, [[0, 1]], sig, tok, 1 << 20)
        sums = hintsd.update(model, tok, trajs, [[0, 1]], sig, ema, cfg, 1 << 20, 1, total)
        opt.step()
        kl.append(sums.kl / sums.kl_tokens)
    assert sums.kl_tokens == trajs[0].steps[0].end - trajs[0].steps[0].start
    assert kl[-1] < 0.8 * kl[0], kl
    sums = hintsd.measure(model, tok, trajs, [[0, 1]], sig, cfg, 10, {})
    assert sums.skipped == 1 and sums.kl_tokens == 0


def test_step_loss_is_the_hand_computed_kl_with_its_gradient(policy, trajs):
    """task_loss's KL term against reverse_kl_loss on plain forwards of the student and the teacher context."""
    tok = policy[1]
    model, params = lora_copy(policy[0], 0.2)
    ema = hintsd.Shadow(params)
    for v in ema.values:
        v.mul_(-1.0)
    t = trajs[1]
    targets = [hintsd.Target(1, j, f"You should do step {j} right.") for j in range(len(t.steps))]
    sig = hintsd.Signal(targets=targets)
    (loss, _, _), sums = hintsd.task_loss(model, tok, trajs, [1], sig, ema, hintsd.LossConfig(topk=5), 1 << 20)
    loss.backward()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    s_rows, t_rows = [], []
    for tg in targets:  # the teacher first: entering the shadow writes the params in place
        s = t.steps[tg.step]
        fb = prompts.feedback_ids(tok, tg.feedback)
        with torch.no_grad(), ema:
            ctx = t.tokens[:s.header] + fb + t.tokens[s.header:s.end]
            keep = torch.arange(s.start + len(fb) - 1, s.end + len(fb) - 1)  # logits only where needed: 152k vocab
            t_rows.append(model(torch.tensor([ctx]), logits_to_keep=keep).logits[0].float())
    for tg in targets:
        s = t.steps[tg.step]
        keep = torch.arange(s.start - 1, s.end - 1)
        s_rows.append(model(torch.tensor([t.tokens[:s.end]]), logits_to_keep=keep).logits[0].float())
    ref = hintsd.reverse_kl_loss(torch.cat(s_rows), torch.cat(t_rows), topk=5, reduction="none").sum()
    ref.backward()
    loss, ref = float(loss.detach()), float(ref.detach())
    assert abs(loss - ref) < 1e-4 * max(1.0, abs(ref)) and sums.kl_tokens == len(torch.cat(s_rows))
    assert all(torch.allclose(a, p.grad, rtol=1e-3, atol=1e-6) for a, p in zip(got, params))


def test_training_resumes_exactly(tiny_qwen, tmp_path):
    common = ["--model", str(tiny_qwen), "--preset", "cpu", "--feedback", "oracle", "--limit", "2",
              "--tasks", "multi_turn_base_105", "multi_turn_base_115", "--rollouts", "2", "--tasks-per-step", "1",
              "--max-new-tokens", "6", "--max-env-steps", "3", "--lora-rank", "4", "--lr", "1e-2", "--ema-rate",
              "0.5", "--temperature", "1.0", "--lora-dropout", "0.1", "--no-after-check"]
    hintsd.main(common + ["--steps", "3", "--out", str(tmp_path / "a")])
    hintsd.main(common + ["--steps", "1", "--out", str(tmp_path / "b")])
    hintsd.main(common + ["--steps", "3", "--out", str(tmp_path / "b"), "--resume"])
    a = torch.load(tmp_path / "a" / "ckpt-000003" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt-000003" / "state.pt", weights_only=True)
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    assert all(torch.equal(x, y) for x, y in zip(a["shadows"]["ema"], b["shadows"]["ema"]))
    assert a["opt"]["state"][0]["exp_avg"].equal(b["opt"]["state"][0]["exp_avg"])
    rows = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["targets"] >= 1 for r in rows)
    assert [json.loads(x)["step"] for x in open(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3]
    assert any(p.abs().sum() > 0 for p in a["params"][1::2])  # the B matrices moved
    assert (tmp_path / "b" / "LATEST").read_text() == "ckpt-000003"
    assert sorted(p.name for p in (tmp_path / "b").glob("ckpt-*")) == ["ckpt-000002", "ckpt-000003"]


def test_env_feedback_picks_error_steps_with_the_raw_output():
    step = lambda out: hintsd.Step(0, 0, 0, 0, "a", [], [{"role": "tool", "content": out}] if out else [])  # noqa
    t = hintsd.Trajectory("x", "c", [], steps=[step('{"ok": true}'), step('{"error": "No such file"}'),
                                               step("Error: unknown function 'x'."), step(None)])
    assert prompts.env_feedback(t, 1) == [(1, 'The environment answered your previous attempt with: '
                                              '{"error": "No such file"}')]
    assert [s for s, _ in prompts.env_feedback(t, 3)] == [1, 2]
    clean = hintsd.Trajectory("x", "c", [], steps=t.steps[:1])
    assert [s for s, _ in prompts.env_feedback(clean, 3)] == [0]  # no error: the last step
    ended = hintsd.Trajectory("x", "c", [], steps=[t.steps[0], t.steps[3]])  # a text answer ended the episode
    assert prompts.env_feedback(ended, 1) == [(1, "Your previous attempt at this step called no tool, and the task "
                                                  "ended there without success.")]
    silent = hintsd.Step(0, 0, 0, 0, "a", [], [{"role": "tool", "content": ""}])  # AppWorld code printing nothing
    assert prompts.env_answer(silent) == "The environment answered your previous attempt with: (no output)"
    assert prompts.env_feedback(t, 3, blank=True) == [(1, prompts.BLANK_FEEDBACK), (2, prompts.BLANK_FEEDBACK)]
    for source, variant, feedback in [("env", "single", ['The environment answered your previous attempt with: '
                                                         '{"error": "No such file"}']),
                                      ("blank", "multi", [prompts.BLANK_FEEDBACK] * 2)]:  # the control: where, not what
        h = hintsd.select_targets(None, None, [clean, t], hintsd.AnalyzerConfig(source=source), variant, "bfcl", {},
                                  {}, "json", "friendly", 0)
        assert [(tg.traj, tg.step) for tg in h.targets] == [(0, 0), (1, 1), (1, 2)][:3 if variant == "multi" else 2]
        assert [tg.feedback for tg in h.targets][1:] == feedback


def test_full_finetuning_flag_trains_every_weight(tiny_qwen, tmp_path):
    hintsd.main(["--model", str(tiny_qwen), "--preset", "cpu", "--feedback", "oracle", "--limit", "1",
                 "--rollouts", "1", "--max-new-tokens", "4", "--max-env-steps", "2", "--lora-rank", "0", "--lr",
                 "1e-3", "--steps", "1", "--no-after-check", "--out", str(tmp_path)])
    from transformers import AutoModelForCausalLM
    state = torch.load(tmp_path / "ckpt-000001" / "state.pt", weights_only=True)
    base = list(AutoModelForCausalLM.from_pretrained(tiny_qwen).parameters())
    assert len(state["params"]) == len(base) and all(p.shape == b.shape for p, b in zip(state["params"], base))
    assert sum(not torch.equal(p, b) for p, b in zip(state["params"], base)) > len(base) // 2  # most weights moved


@pytest.mark.parametrize("bad,message", [(["--variant", "triple"], "invalid choice"),
                                         (["--feedback", "gpt"], "invalid choice"),
                                         (["--rollouts", "0"], "must be >= 1"),
                                         (["--ema-rate", "1.5"], "--ema-rate must be in [0, 1]")])
def test_cli_rejects_bad_values(bad, message, capsys):
    with pytest.raises(SystemExit) as e:
        hintsd.parse_args(bad)
    assert e.value.code == 2 and message in capsys.readouterr().err
