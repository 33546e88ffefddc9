"""The real embedded model (Qwen2.5-Coder-0.5B-Instruct) on a real BFCL task, end to end: rollouts through the
real backends and the official checker, then one HINT-SD update with ground-truth oracle feedback."""
import copy

import torch

import envs
import hintsd


def test_embedded_model_real_bfcl_rollout_and_one_hintsd_update(embedded_dir):
    model, tok = hintsd.load_model(embedded_dir)
    task = envs.load_tasks("bfcl", "test")[0]
    cfg = hintsd.SamplingConfig(max_new_tokens=48, temperature=0.6, max_len=8192)
    gen = torch.Generator().manual_seed(0)
    trajs = hintsd.rollout(model, tok, [envs.make_env(task, max_steps=3) for _ in range(2)], cfg, gen)
    for t in trajs:
        assert t.reward in (0.0, 1.0) and t.status == "done" and 1 <= len(t.steps) <= 3
        for s in t.steps:
            assert hintsd.action_mask_text(tok, t, [s])[0] in (s.text + "<|im_end|>", s.text)
    # the model really talks to the backends: some step produced a tool result
    assert any(m["role"] == "tool" for t in trajs for m in t.messages)

    failed = [i for i, t in enumerate(trajs) if t.reward < 1.0]
    stats = hintsd.new_stats()
    targets = hintsd.select_targets(model, tok, trajs, "oracle", 3, {}, {task["id"]: task}, "json", 0, stats)
    assert failed and targets and all(trajs[tg.traj].reward < 1.0 for tg in targets)
    student = copy.deepcopy(model)
    params = hintsd.trainable_params(student, 8, 16)
    st = hintsd.new_stats()
    hintsd.distill(student, tok, trajs, targets, hintsd.Shadow(params), 8192, None, st)
    assert st["tokens"] == sum(trajs[tg.traj].steps[tg.step].end - trajs[tg.traj].steps[tg.step].start for tg in targets)
    assert st["loss_sum"] > 0 and torch.isfinite(torch.tensor(st["loss_sum"]))  # the feedback changes the teacher
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
