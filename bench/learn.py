"""A learning run that fits a 2-core CPU: does HINT-SD turn failures into successes? (`eval.py --plot` draws it.)

    python bench/learn.py [--methods hintsd-oracle hintsd-ema grpo initial] [--steps 10] [--eval-every 5]
                          [--out runs/learn] [-- EXTRA HINTSD ARGS]

BFCL tasks cut to their first user turn (--turns 1), the embedded 0.5B model, the cpu preset otherwise (friendly
protocol, compact analyzer prompt, lenient parser) with: --rollouts 4, --max-env-steps 3, --max-new-tokens 64,
--lr 1e-4 (LoRA at the paper's 5e-6 barely moves a 0.5B model in 20 steps), --tasks-per-step 1, seed 42. Two
trained tasks (a training step takes about 3 minutes on 2 cores), four held-out tasks of the test split. Run one
method at a time: two torch processes on 2 cores slow each other down many times over.
Methods, each in OUT/<method>: its training run (a hintsd.py run dir) in run/, its evaluations in curve.jsonl:
  hintsd-oracle  HINT-SD with the BFCL ground-truth oracle as the hindsight source (the upper bound)
  hintsd-ema     HINT-SD with the EMA teacher as the analyzer (the paper's method)
  grpo           the terminal-reward baseline
  initial        no training: the base model's evaluation (it cannot change; its line is flat by definition)
Every --eval-every steps, and at step 0, the trained tasks are evaluated (k rollouts each, temperature 0.6,
rollout r of a task always seeded by (seed, task, r)); the held-out tasks before and after. An interrupted run
resumes where it stopped (training from its checkpoints; evaluation points already in curve.jsonl are kept).
OUT/summary.md holds the table; for hintsd-ema also the analyzer's parse failures and how often its first target
is the oracle's first wrong step.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
import eval as ev  # noqa: E402
import hintsd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"hintsd-oracle": ["--method", "hintsd", "--feedback", "oracle"],
           "hintsd-ema": ["--method", "hintsd", "--feedback", "ema"],
           "grpo": ["--method", "grpo"], "initial": None}
TRAIN = ["multi_turn_base_93", "multi_turn_base_146"]
HELD_OUT = ["multi_turn_base_116", "multi_turn_base_126", "multi_turn_base_142", "multi_turn_base_107"]


def evaluate(a, run: Path, step: int, ids: list[str], split: str) -> dict:
    """Successes of k seeded rollouts per task, with the policy of checkpoint `step` (0: the base model)."""
    model, tok = hintsd.load_model(a.model)
    if step:
        state, saved = hintsd.read_checkpoint(run / f"ckpt-{step:06d}", "cpu")
        params = hintsd.trainable_params(model, saved["lora_rank"], saved["lora_alpha"], 0.0, saved["lora_targets"])
        with hintsd.torch.no_grad():
            for p, v in zip(params, state["params"]):
                p.copy_(v)
    tasks = [t for t in envs.load_tasks("bfcl", split, 1) if t["id"] in ids]
    cfg = hintsd.SamplingConfig(a.new, 0.6, 1.0, 8192)
    results = []
    for task in tasks:
        s = ev.evaluate(model, tok, [task], a.k, cfg, "json", a.env_steps, a.seed, None, f"eval {task['id']}",
                        protocol="friendly")
        results.append((task["id"], round(s["overall"]["avg_at_k"] * a.k / 100)))
    return {"successes": sum(n for _, n in results), "rollouts": a.k * len(results), "per_task": dict(results)}


def train_to(a, run: Path, method: str, step: int, extra: list[str]) -> None:
    """Train (or resume) OUT/<method> up to `step` steps, in a process of its own."""
    cmd = [sys.executable, str(ROOT / "hintsd.py"), *METHODS[method], "--preset", "cpu", "--turns", "1",
           "--tasks", *a.train, "--tasks-per-step", "1", "--rollouts", "4", "--max-env-steps", str(a.env_steps),
           "--max-new-tokens", str(a.new), "--lr", str(a.lr), "--seed", str(a.seed), "--steps", str(step),
           "--model", a.model, "--out", str(run), *(["--resume"] if (run / "LATEST").exists() else []), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def analyzer_agreement(run: Path, by_id: dict) -> tuple[int, int, int]:
    """(failed rollouts analyzed, of them with an analyzer target, of those whose first target is the oracle's
    first wrong step) over a run's rollouts.jsonl."""
    analyzed = with_target = agree = 0
    for line in open(run / "rollouts.jsonl"):
        for r in json.loads(line)["rollouts"]:
            if r["reward"] >= 1.0 or not r["steps"]:
                continue
            analyzed += 1
            if r["targets"]:
                with_target += 1
                oracle = envs.oracle_feedback(by_id[r["task_id"]], [(s["turn"], s["text"]) for s in r["steps"]])
                agree += bool(oracle) and oracle[0][0] - 1 == r["targets"][0]["step"]
    return analyzed, with_target, agree


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--train", nargs="+", default=TRAIN, metavar="ID", help="train-split task ids to train on")
    ap.add_argument("--held-out", nargs="+", default=HELD_OUT, metavar="ID", help="test-split task ids")
    ap.add_argument("--steps", type=hintsd.positive_int, default=10)
    ap.add_argument("--eval-every", type=hintsd.positive_int, default=5)
    ap.add_argument("--k", type=hintsd.positive_int, default=4, help="evaluation rollouts per task")
    ap.add_argument("--lr", type=hintsd.positive_float, default=1e-4)
    ap.add_argument("--env-steps", type=hintsd.positive_int, default=3)
    ap.add_argument("--new", type=hintsd.positive_int, default=64, help="max new tokens per action")
    ap.add_argument("--seed", type=hintsd.nonneg_int, default=42)
    ap.add_argument("--model", default=hintsd.DEFAULT_MODEL)
    ap.add_argument("--out", default="runs/learn")
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    hintsd.check_model_name(ap, a.model)
    out = hintsd.check_out_dir(ap, a.out)
    points = sorted({0, *range(a.eval_every, a.steps, a.eval_every), a.steps})
    summary = []
    for method in a.methods:
        run = out / method / "run"
        (out / method).mkdir(exist_ok=True)
        curve = out / method / "curve.jsonl"
        done = {(r["step"], r["set"]) for r in map(json.loads, curve.open())} if curve.exists() else set()
        t0 = time.time()
        for step in points if METHODS[method] else [0]:
            if METHODS[method] and step and not (run / f"ckpt-{step:06d}").exists():
                train_to(a, run, method, step, extra)
            for name, ids, split in (("trained", a.train, "train"), ("held-out", a.held_out, "test")):
                if (step, name) in done or (name == "held-out" and step not in (0, a.steps)):
                    continue
                row = {"step": step, "set": name, **evaluate(a, run, step, ids, split)}
                with curve.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{method} step {step} {name}: {row['successes']}/{row['rollouts']} {row['per_task']}",
                      flush=True)
        rows = [json.loads(x) for x in curve.open()]
        first = {r["set"]: r for r in rows if r["step"] == 0}
        last = {r["set"]: r for r in rows if r["step"] == max(x["step"] for x in rows)}
        line = f"| {method} | " + " | ".join(f"{first[s]['successes']}/{first[s]['rollouts']} -> "
                                             f"{last[s]['successes']}/{last[s]['rollouts']}" for s in
                                             ("trained", "held-out")) + f" | {(time.time() - t0) / 60:.0f} min |"
        if method == "hintsd-ema" and (run / "rollouts.jsonl").exists():
            n, hit, agree = analyzer_agreement(run, {t["id"]: t for t in envs.load_tasks("bfcl", "train", 1)})
            line += f" analyzed {n} failed rollouts: a target for {hit}, first target = oracle's step for {agree} |"
        summary.append(line)
        print(line, flush=True)
    head = ["| method | trained: success step 0 -> last | held-out: before -> after | wall time (this call) |",
            "|---|---|---|---|"]
    (out / "summary.md").write_text("\n".join(head + summary) + "\n")
    print("\n".join(head + summary))


if __name__ == "__main__":
    main()
