"""Targeted self-distillation on real BFCL rollouts of a tiny random-init Qwen2 with the real Qwen tokenizer."""
import copy
import json

import pytest
import torch

import envs
import hintsd
import prompts


def test_rollout_keeps_exact_ids_and_spans_decode_to_the_actions(policy, trajs):
    model, tok = policy
    for t in trajs:
        assert t.status == "done" and t.reward == 0.0 and 1 <= len(t.steps) <= 4
        for s in t.steps:
            assert tok.decode(t.tokens[s.header:s.start]) == "<|im_start|>assistant\n"  # header excluded from mask
            ids = t.tokens[s.start:s.end]
            assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") or len(ids) == 12
            assert tok.decode(ids[:-1] if ids[-1] == tok.eos_token_id else ids) == s.text
            assert hintsd.action_mask_text(tok, t, [s])[0].startswith(s.text)
        # the ids are what the policy saw: rendering the final chat gives the same text (prompt + actions + outputs)
        rendered = hintsd.render(tok, t.messages, envs.make_env(envs.load_tasks("bfcl", "train")[0]).tools, False)
        assert rendered.startswith(tok.decode(t.tokens[:t.steps[-1].end]))


def test_teacher_context_inserts_one_feedback_message_before_the_action(policy, trajs):
    model, tok = policy
    t, s = trajs[0], trajs[0].steps[-1]
    fb = hintsd.feedback_ids(tok, "You should call ls first.")
    teacher = t.tokens[:s.header] + fb + t.tokens[s.header:s.end]
    text = tok.decode(teacher)
    want = tok.decode(t.tokens[:s.header]) + "<|im_start|>user\n" + prompts.feedback_message(
        "You should call ls first.")["content"] + "<|im_end|>\n<|im_start|>assistant\n" + tok.decode(t.tokens[s.start:s.end])
    assert text == want


def test_prefix_reuse_teacher_equals_full_teacher_forward(policy, trajs):
    model, tok = policy
    t = max(trajs, key=lambda x: len(x.steps))
    steps = t.steps[:3]
    fbs = [hintsd.feedback_ids(tok, f"hint number {i}") for i in range(len(steps))]
    fast = hintsd.teacher_logits(model, t, steps, fbs, reuse_prefix=True)
    slow = hintsd.teacher_logits(model, t, steps, fbs, reuse_prefix=False)
    for a, b, s in zip(fast, slow, steps):
        assert a.shape == (s.end - s.start, len(tok)) and torch.allclose(a, b, atol=1e-4)
    # and against a plain full forward of the teacher context (independent of our position bookkeeping)
    s, fb = steps[0], fbs[0]
    ids = torch.tensor([t.tokens[:s.header] + fb + t.tokens[s.header:s.end]])
    ref = model(ids).logits[0, s.start + len(fb) - 1: s.end + len(fb) - 1].float()
    assert torch.allclose(fast[0], ref, atol=1e-4)


def test_student_logits_are_the_shifted_full_forward_at_the_spans(policy, trajs):
    model, tok = policy
    t = trajs[0]
    got = hintsd.student_logits(model, t, t.steps)
    full = model(torch.tensor([t.tokens[:t.steps[-1].end]])).logits[0].float()
    want = torch.cat([full[s.start - 1: s.end - 1] for s in t.steps])
    assert torch.allclose(got, want, atol=1e-4)


def test_distill_moves_student_towards_teacher_and_skips_overflow(policy, trajs):
    model, tok = policy
    model = copy.deepcopy(model)
    params = hintsd.trainable_params(model, 4, 8)
    ema = hintsd.Shadow(params)
    g = torch.Generator().manual_seed(0)
    for v in ema.values:  # a teacher that really differs from the student, so there is something to learn
        v.add_(torch.randn(v.shape, generator=g) * 0.5)
    opt = torch.optim.AdamW(params, lr=1e-2)
    targets = [hintsd.Target(0, 0, "You should list the files first.")]
    kl = []
    for _ in range(4):
        st = hintsd.new_stats()
        opt.zero_grad()
        hintsd.distill(model, tok, trajs, targets, ema, 16384, None, st)
        opt.step()
        kl.append(st["loss_sum"] / st["tokens"])
    assert kl[-1] < 0.8 * kl[0], kl
    st = hintsd.new_stats()
    hintsd.distill(model, tok, trajs, targets, ema, max_len=10, topk=None, stats=st)
    assert st["skipped_overflow"] == 1 and st["tokens"] == 0


def test_training_resumes_exactly(tiny_qwen, tmp_path):
    common = ["--model", str(tiny_qwen), "--feedback", "oracle", "--limit", "2", "--rollouts", "2",
              "--tasks-per-step", "1", "--max-new-tokens", "6", "--max-env-steps", "3", "--lora-rank", "4",
              "--lr", "1e-2", "--ema-rate", "0.5", "--temperature", "1.0", "--no-after-check"]
    hintsd.main(common + ["--steps", "3", "--out", str(tmp_path / "a")])
    hintsd.main(common + ["--steps", "1", "--out", str(tmp_path / "b")])
    hintsd.main(common + ["--steps", "3", "--out", str(tmp_path / "b"), "--resume"])
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "a" / "ckpt-000003" / "state.safetensors"))
    b = load_file(str(tmp_path / "b" / "ckpt-000003" / "state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["targets"] >= 1 for r in rows)
    assert any(not torch.equal(a[f"param.{i}"], torch.zeros_like(a[f"param.{i}"])) for i in range(1, 20, 2))
    assert (tmp_path / "b" / "LATEST").read_text() == "ckpt-000003"


def test_cli_rejects_bad_values(capsys):
    for bad in (["--variant", "triple"], ["--feedback", "gpt"], ["--rollouts", "0"], ["--ema-rate", "1.5"]):
        with pytest.raises(SystemExit):
            hintsd.parse_args(bad)
    assert "invalid choice" in capsys.readouterr().err


def test_env_feedback_picks_error_steps_with_the_raw_output():
    t = hintsd.Trajectory("x", "c", [
        {"role": "user", "content": "do it"},
        {"role": "assistant", "content": "a"}, {"role": "tool", "content": '{"ok": true}'},
        {"role": "assistant", "content": "b"}, {"role": "tool", "content": '{"error": "No such file"}'},
        {"role": "assistant", "content": "c"}, {"role": "tool", "content": "Error: unknown function 'x'."},
        {"role": "assistant", "content": "d"}])
    got = hintsd.env_feedback(t, 1)
    assert got == [(2, 'The environment answered your previous attempt with: {"error": "No such file"}')]
    assert [s for s, _ in hintsd.env_feedback(t, 3)] == [2, 3]
    clean = hintsd.Trajectory("x", "c", t.messages[:3])
    assert [s for s, _ in hintsd.env_feedback(clean, 3)] == [1]  # no error: the last step


def test_full_finetuning_flag_trains_every_weight(tiny_qwen, tmp_path):
    hintsd.main(["--model", str(tiny_qwen), "--feedback", "oracle", "--limit", "1", "--rollouts", "1",
                 "--max-new-tokens", "4", "--max-env-steps", "2", "--lora-rank", "0", "--lr", "1e-3",
                 "--steps", "1", "--no-after-check", "--out", str(tmp_path)])
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    state = load_file(str(tmp_path / "ckpt-000001" / "state.safetensors"))
    base = list(AutoModelForCausalLM.from_pretrained(tiny_qwen).parameters())
    params = [state[f"param.{i}"] for i in range(len(base))]
    assert f"param.{len(base)}" not in state and all(p.shape == b.shape for p, b in zip(params, base))
    assert sum(not torch.equal(p, b) for p, b in zip(params, base)) > len(base) // 2  # most weights moved
