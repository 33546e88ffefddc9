"""Throughput of rollout() itself: tokens sampled per second of wall time, prefill, environment steps and host work
included (what a training step pays), on real BFCL train tasks.

    python bench/rollout.py [--model embedded] [--tasks 2] [--rollouts 4] [--env-steps 6] [--new 96] [--code DIR]

The first --tasks train tasks (the paper split) x --rollouts rollouts, temperature 0.6, friendly protocol (the one
every version of hintsd has), all in one rollout() batch; at most --env-steps assistant steps per episode and
--new tokens per action. --code DIR times the hintsd.py / envs.py of another checkout (say a worktree of an older
commit) with the same settings, so two versions can be compared in one run on one machine. One untimed warm-up
rollout (1 task, 1 step) first. Prints one JSON line.
"""
import argparse
import inspect
import json
import sys
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--env-steps", type=int, default=6)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]), help="checkout whose code is timed")
    a = ap.parse_args()
    if min(a.tasks, a.rollouts, a.env_steps, a.new) < 1:
        ap.error("--tasks, --rollouts, --env-steps and --new must be >= 1")
    sys.path.insert(0, str(Path(a.code).resolve()))
    import torch
    import envs
    import hintsd
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = hintsd.load_model(a.model, device)
    old_api = "gen" in inspect.signature(hintsd.rollout).parameters  # before per-rollout seeds

    def play(tasks, steps):
        envs_ = [envs.make_env(t, "json", steps) for t in tasks for _ in range(a.rollouts)]
        cfg = hintsd.SamplingConfig(max_new_tokens=a.new, temperature=0.6, top_p=1.0, max_len=24576)
        seeds = torch.Generator(device=model.device).manual_seed(0) if old_api else list(range(len(envs_)))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trajs = hintsd.rollout(model, tok, envs_, cfg, seeds)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return trajs, time.perf_counter() - t0
    tasks = envs.load_tasks("bfcl", "train")[: a.tasks]
    play(tasks[:1], 1)
    trajs, dt = play(tasks, a.env_steps)
    sampled = sum(len(s.logprobs) for t in trajs for s in t.steps)
    print(json.dumps({"code": a.code, "device": device, "seconds": round(dt, 2), "sampled_tokens": sampled,
                      "tok_s": round(sampled / dt, 1), "steps": sum(len(t.steps) for t in trajs),
                      "tokens_in_context": sum(len(t.tokens) for t in trajs), "rollouts": len(trajs)}))


if __name__ == "__main__":
    main()
