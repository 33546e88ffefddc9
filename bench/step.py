"""Time and peak memory of one update on fixed failed rollouts: HINT-SD against SDPO and against no prefix sharing.

    python bench/step.py [--model embedded] [--dtypes float32 bfloat16] [--rollouts 4] [--k 3] [--env-steps 10]
                         [--new 64] [--trajs FILE]

All rows run on the same failed rollouts (the n rollouts of one task), each in a fresh subprocess so each peak is
its own: on CPU the growth of peak RSS over the loaded model, on CUDA torch's peak allocation over the model (after
one untimed warm-up update):
  hintsd    K targets per failed rollout, evenly spread over its steps; the student's and the teacher's sequences
            packed into prefix trees (the shared prompt and shared rollout prefixes run once)
  sdpo      the same feedback once before the first action; every action token of the failed rollouts distilled
  unpacked  hintsd's targets, one forward per sequence (no shared prefix: --pack-tokens 0)
Every row runs in each of --dtypes (default: float32 and bfloat16 on a CPU, bfloat16 on a GPU) on the same rollouts,
and reports the targeted KL it measured, so the dtypes' numbers can be compared as well as their times.
Without --trajs, rollouts are sampled first (with the seed of the task and the rollout: the same file on the same
machine and code) and saved (runs/bench-step/trajs.jsonl); a rollout that succeeded is dropped. The JSONL holds
trajectories as hintsd.py's rollouts.jsonl does.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
import hintsd  # noqa: E402

FEEDBACK = "You should check the current directory contents with ls before acting on a file."


def spread_steps(n: int, k: int) -> list[int]:
    """k distinct step indices evenly spread over n steps (0-based)."""
    return sorted({min(n - 1, round((i + 1) * n / (k + 1))) for i in range(k)})


def run_one(a):
    """Child process: load the model, time one update of one method on the saved rollouts, print a JSON line."""
    model, tok = hintsd.load_model(a.model, a.device, getattr(torch, a.dtype))
    params = hintsd.trainable_params(model, 32, 64, 0.0, a.lora_targets)
    teacher = hintsd.Shadow(params)
    trajs = [hintsd.Trajectory.from_json(json.loads(x)) for x in open(a.trajs)]
    spread = [hintsd.Target(i, j, FEEDBACK) for i, t in enumerate(trajs) for j in spread_steps(len(t.steps), a.k)]
    once = [hintsd.Target(i, 0, FEEDBACK) for i in range(len(trajs))]
    sig = hintsd.Signal(hintsd.sdpo_targets(trajs, once) if a.method == "sdpo" else spread)
    cfg = hintsd.LossConfig(topk=a.topk, norm="task", pack_tokens=0 if a.method == "unpacked" else a.pack_tokens,
                            grad_ckpt=a.grad_ckpt)
    groups = [list(range(len(trajs)))]  # one task
    total = hintsd.token_totals(trajs, groups, sig, tok, 1 << 30)

    def update():
        return hintsd.update(model, tok, trajs, groups, sig, teacher, cfg, 1 << 30, 1, total)
    cuda = model.device.type == "cuda"
    if cuda:  # one untimed pass: CUDA context, cuBLAS handles and kernel selection are paid before timing
        update()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 2**30 if cuda else hintsd.peak_memory_gb(model.device)
    for p in params:
        p.grad = None
    t0 = time.perf_counter()
    sums = update()
    if cuda:
        torch.cuda.synchronize()
    print(json.dumps({"method": a.method, "dtype": a.dtype, "seconds": time.perf_counter() - t0,
                      "tokens": sums.kl_tokens, "kl": sums.kl / max(sums.kl_tokens, 1), "trajectories": len(trajs),
                      "peak_gb": hintsd.peak_memory_gb(model.device) - base}))


def sample_failed(a):
    model, tok = hintsd.load_model(a.model, a.device)
    cfg = hintsd.SamplingConfig(max_new_tokens=a.new, temperature=0.6, max_len=24576)
    task = next(t for t in envs.load_tasks("bfcl", "train") if a.task in (None, t["id"]))
    envs_ = [envs.make_env(task, "json", a.env_steps, a.protocol) for _ in range(a.rollouts)]
    trajs = hintsd.rollout(model, tok, envs_, cfg, [hintsd.seed_of(0, task["id"], r) for r in range(a.rollouts)])
    Path(a.trajs).parent.mkdir(parents=True, exist_ok=True)
    with open(a.trajs, "w") as f:
        for t in trajs:
            if t.reward < 1.0 and len(t.steps) >= 2:
                f.write(json.dumps(t.to_json()) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=hintsd.DEFAULT_MODEL)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--trajs", default="runs/bench-step/trajs.jsonl", help="failed rollouts (JSONL of trajectories)")
    ap.add_argument("--rollouts", type=hintsd.positive_int, default=4, help="rollouts of the task when sampling")
    ap.add_argument("--k", type=hintsd.positive_int, default=3, help="targets per failed rollout (Multi: 3)")
    ap.add_argument("--new", type=hintsd.positive_int, default=64, help="max new tokens per action when sampling")
    ap.add_argument("--env-steps", type=hintsd.positive_int, default=10, help="max assistant steps when sampling")
    ap.add_argument("--task", default=None, help="BFCL train task id to sample (default: the first train task)")
    ap.add_argument("--protocol", default="authors", choices=envs.ACTION_PROTOCOLS)
    ap.add_argument("--topk", type=hintsd.topk_value, default=100, help="the loss's top-k (paper: 100), or exact")
    ap.add_argument("--pack-tokens", type=hintsd.nonneg_int, default=16384)
    ap.add_argument("--grad-ckpt", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--lora-targets", nargs="+", default=["q_proj", "v_proj"])
    ap.add_argument("--methods", nargs="+", default=["hintsd", "sdpo", "unpacked"],
                    choices=["hintsd", "sdpo", "unpacked"])
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                    help="default: float32 bfloat16 on a CPU, bfloat16 on a GPU")
    ap.add_argument("--method", choices=["hintsd", "sdpo", "unpacked"], help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    a = ap.parse_args()
    hintsd.check_device(ap, a.device)
    if a.method:
        return run_one(a)
    hintsd.check_model_name(ap, a.model)
    if not Path(a.trajs).exists():
        sample_failed(a)
    trajs = [json.loads(x) for x in open(a.trajs)]
    if not trajs:
        raise SystemExit(f"{a.trajs}: no failed rollout with 2+ steps to update on")
    print(f"{len(trajs)} failed rollouts, lengths {[len(t['tokens']) for t in trajs]} tokens, "
          f"steps {[len(t['steps']) for t in trajs]}", flush=True)
    res = {}
    for dtype in a.dtypes or (["bfloat16"] if a.device.startswith("cuda") else ["float32", "bfloat16"]):
        for m in a.methods:
            cmd = [sys.executable, __file__, "--method", m, "--dtype", dtype, "--model", a.model, "--device", a.device,
                   "--trajs", a.trajs, "--k", str(a.k), "--topk", str(a.topk or "exact"), "--pack-tokens",
                   str(a.pack_tokens), "--grad-ckpt", a.grad_ckpt, "--lora-targets", *a.lora_targets]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"[step] {m} {dtype} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            res[m, dtype] = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(res[m, dtype]), flush=True)
    ref = next(iter(res.values()))
    print("\n| method | dtype | update s | peak GB | tokens supervised | KL | time / first row | memory / first row |")
    print("|---|---|---|---|---|---|---|---|")
    for (m, dtype), r in res.items():
        print(f"| {m} | {dtype} | {r['seconds']:.2f} | {r['peak_gb']:.2f} | {r['tokens']} | {r['kl']:.5f} | "
              f"{r['seconds'] / ref['seconds']:.2f}x | {r['peak_gb'] / max(ref['peak_gb'], 1e-9):.2f}x |")


if __name__ == "__main__":
    main()
