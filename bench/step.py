"""Time and peak memory of one HINT-SD update against full-trajectory distillation and a naive teacher.

    python bench/step.py [--model embedded] [--trajs FILE.jsonl] [--k 3]

All three run on the same failed rollouts, in one run, each in a fresh subprocess, so each peak figure is its
own: on CPU the growth of peak RSS over the loaded model, on CUDA torch's peak allocation over the model
(after one untimed warm-up pass):
  hintsd  K targets per failed rollout; one student forward truncated after the last target; the teacher
          runs the shared prefix once and reuses its KV cache for every target.
  full    SDPO (hintsd.sdpo_targets): the same feedback placed once before the first action; the student is
          distilled on every action token of the failed rollout.
  naive   hintsd's targets, but the teacher recomputes the whole prefix for every target.
Targets are K steps evenly spaced over each failed rollout, so the analyzer's choice does not enter the timing.
Without --trajs, failed rollouts are sampled first (and saved to runs/bench-step/trajs.jsonl).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hintsd  # noqa: E402

FEEDBACK = "You should check the current directory contents with ls before acting on a file."


def spread_steps(n: int, k: int) -> list[int]:
    """k distinct step indices evenly spread over n steps (0-based)."""
    return sorted({min(n - 1, round((i + 1) * n / (k + 1))) for i in range(k)})


def run_one(args):
    """Child process: load the model, time one update of the given method, print a JSON line."""
    model, tok = hintsd.load_model(args.model, args.device)
    params = hintsd.trainable_params(model, 32, 64)
    model.activation_checkpointing_enable({"use_reentrant": False})
    teacher = hintsd.Shadow(params)
    trajs = [hintsd.Trajectory.from_json(json.loads(x)) for x in open(args.trajs)]
    trajs = [t for t in trajs if t.reward < 1.0 and len(t.steps) >= 2]
    spread = [hintsd.Target(i, j, FEEDBACK) for i, t in enumerate(trajs) for j in spread_steps(len(t.steps), args.k)]
    # full = SDPO: the feedback once before the first action, every action token distilled
    once = [hintsd.Target(i, 0, FEEDBACK) for i in range(len(trajs))]
    targets = hintsd.sdpo_targets(trajs, once) if args.method == "full" else spread

    def update():
        st = hintsd.new_stats()
        hintsd.distill(model, tok, trajs, targets, teacher, 1 << 30, None, st, reuse_prefix=args.method != "naive")
        return st["tokens"]

    cuda = model.device.type == "cuda"
    if args.teacher_only:
        update = lambda: 0  # noqa: E731
    if cuda:  # one untimed pass: CUDA context, cuBLAS handles and kernel selection are paid before timing
        update()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 2**30 if cuda else hintsd.peak_memory_gb(model.device)
    for p in params:
        p.grad = None
    t0 = time.perf_counter()
    tokens = update()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = hintsd.peak_memory_gb(model.device) - base
    teacher_s = None
    if args.method != "full":  # the teacher part alone: prefix reuse (hintsd) against recomputation (naive)
        fb = hintsd.feedback_ids(tok, FEEDBACK)
        t0 = time.perf_counter()
        with teacher:
            for t in trajs:
                steps = [t.steps[j] for j in spread_steps(len(t.steps), args.k)]
                hintsd.teacher_logits(model, t, steps, [fb] * len(steps), reuse_prefix=args.method == "hintsd")
        if cuda:
            torch.cuda.synchronize()
        teacher_s = time.perf_counter() - t0
    print(json.dumps({"method": args.method, "seconds": dt, "teacher_seconds": teacher_s, "tokens": tokens,
                      "trajectories": len(trajs), "peak_gb": peak}))


def sample_failed(args):
    import envs
    model, tok = hintsd.load_model(args.model, args.device)
    cfg = hintsd.SamplingConfig(max_new_tokens=args.new, temperature=0.6, max_len=24576)
    gen = torch.Generator(device=model.device).manual_seed(0)
    task = next(t for t in envs.load_tasks("bfcl", "train") if args.task in (None, t["id"]))
    trajs = hintsd.rollout(model, tok, [envs.make_env(task, max_steps=args.env_steps) for _ in range(2)], cfg, gen)
    Path(args.trajs).parent.mkdir(parents=True, exist_ok=True)
    with open(args.trajs, "w") as f:
        for t in trajs:
            f.write(json.dumps(t.to_json()) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=hintsd.DEFAULT_MODEL)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--trajs", default="runs/bench-step/trajs.jsonl", help="failed rollouts (JSONL of trajectories)")
    ap.add_argument("--k", type=int, default=3, help="targets per failed rollout (HINT-SD Multi: 3)")
    ap.add_argument("--new", type=int, default=64, help="max new tokens per action when sampling rollouts")
    ap.add_argument("--env-steps", type=int, default=10, help="max assistant steps when sampling rollouts")
    ap.add_argument("--task", default=None, help="BFCL task id to sample rollouts of (default: the first train task)")
    ap.add_argument("--teacher-only", action="store_true",
                    help="time only the teacher of hintsd (prefix reuse) against naive recomputation")
    ap.add_argument("--method", choices=["hintsd", "full", "naive"], help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.method:
        return run_one(args)
    if not Path(args.trajs).exists():
        sample_failed(args)
    trajs = [json.loads(x) for x in open(args.trajs)]
    print(f"{len(trajs)} rollouts, lengths {[len(t['tokens']) for t in trajs]} tokens, "
          f"steps {[len(t['steps']) for t in trajs]}, rewards {[t['reward'] for t in trajs]}", flush=True)
    res = {}
    for m in ("hintsd", "naive") if args.teacher_only else ("hintsd", "full", "naive"):
        cmd = [sys.executable, __file__, "--method", m, "--model", args.model, "--device", args.device,
               "--trajs", args.trajs, "--k", str(args.k)] + ["--teacher-only"] * args.teacher_only
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        res[m] = json.loads(out)
        print(out, flush=True)
    h = res["hintsd"]
    if args.teacher_only:
        print(f"teacher with prefix reuse {h['teacher_seconds']:.1f} s, naive {res['naive']['teacher_seconds']:.1f} s: "
              f"{res['naive']['teacher_seconds'] / h['teacher_seconds']:.2f}x faster")
        return
    print("\n| method | update s | teacher s | peak GB | tokens supervised | time / hintsd | memory / hintsd |")
    print("|---|---|---|---|---|---|---|")
    for m, r in res.items():
        teacher = f"{r['teacher_seconds']:.2f}" if r.get("teacher_seconds") is not None else "-"
        print(f"| {m} | {r['seconds']:.1f} | {teacher} | {r['peak_gb']:.2f} | {r['tokens']} | "
              f"{r['seconds'] / h['seconds']:.2f}x | {r['peak_gb'] / max(h['peak_gb'], 1e-9):.2f}x |")
    print(f"\nteacher with prefix reuse vs naive recomputation: "
          f"{res['naive']['teacher_seconds'] / h['teacher_seconds']:.2f}x faster")


if __name__ == "__main__":
    main()
