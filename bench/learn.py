"""A learning run that fits a 2-core CPU, and Table 3 of the paper at its scale: does HINT-SD turn failures into
successes, and with which source of hindsight? (`eval.py --plot` draws it.)

    python bench/learn.py [--methods ...] [--train ID ...] [--steps 10] [--eval-every 5] [--out runs/learn]
                          [-- EXTRA HINTSD ARGS]

BFCL tasks cut to their first user turn (--turns 1), the embedded 0.5B model, the cpu preset otherwise (friendly
protocol, LoRA on every projection, exact KL) with: --rollouts 4, --max-env-steps 3, --max-new-tokens 64, --lr 1e-4
(LoRA at the paper's 5e-6 barely moves a 0.5B model in 10 steps), --tasks-per-step 1, seed 42 (--tasks-per-step and
--rollouts change the batch: 4 x 2 trains every task at every step). Four trained tasks
(one of each API class the model meets here), four held-out tasks of the test split. Run one method at a time: two
torch processes on 2 cores slow each other down many times over.
Methods, each in OUT/<method>: its training run (a hintsd.py run dir) in run/, its evaluations in curve.jsonl.
The hindsight sources of Table 3 (HINT-SD Multi, only the source changes):
  hintsd-ema          the EMA teacher as the analyzer with the paper's analyzer (the authors' view with the tool
                      schemas, their prompt, temperature 0.6, top-p 0.95, 512 tokens, their strict parser)
  hintsd-ema-compact  the EMA teacher with the cpu preset's analyzer (compact view, greedy, 128 tokens, lenient)
  hintsd-policy       the current policy as the analyzer (the paper's analyzer)
  hintsd-initial      the frozen initial policy as the analyzer (the paper's analyzer)
  hintsd-env          no analyzer: the raw environment output of the first failing steps
  hintsd-blank        a control: hintsd-env's steps, feedback that says only that the step failed
  hintsd-oracle       the BFCL ground-truth oracle (an upper bound, not self-hindsight)
  hintsd-larger       a larger model as the analyzer (the paper's analyzer): Qwen2.5-Coder-1.5B-Instruct, built by
                      bench/larger_analyzer.py on first use (no ground truth; but not self-hindsight)
  hintsd-larger-tool  the same 1.5B analyzer, its answers forced to parse (--analyzer-forced) and its feedback opened
                      with a tool of the task's list, picked against a blanked-request prior (--analyzer-tool-pick)
  hintsd-best         the EMA teacher with the best setting of bench/analyzer.py (the paper's analyzer with its
                      answers forced to parse: --analyzer-forced) and corrections checked by replay (--verify-targets)
  hintsd-best-sampled the same, where a target whose greedy correction fails replay gets 3 sampled tries, the first
                      that passes quoted in its feedback (--verify-samples 4)
and the controls: grpo (the terminal reward) and initial (no training: the base model, flat by definition).
Every --eval-every steps, and at step 0, the trained tasks are evaluated (k rollouts each, temperature 0.6,
rollout r of a task always seeded by (seed, task, r)); the held-out tasks before and after. The step-0 evaluation
is the same for every method (same weights, same seeds): it runs once, into OUT/step0.jsonl. An interrupted run
resumes where it stopped (training from its checkpoints; evaluation points already in curve.jsonl are kept).
OUT/summary.md holds the table of every method run into OUT (wall time summed over calls, those stopped by Ctrl-C
or kill included), with what the analyzer did (failed rollouts analysed, targets, parse failures, targets dropped
by replay, how often a first target is the oracle's first wrong step, and how often its feedback names the
function of the oracle's right call).
"""
import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
import eval as ev  # noqa: E402
import hintsd  # noqa: E402
from bench import analyzer, larger_analyzer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAPER_ANALYZER = ["--analyzer-prompt", "authors", "--analyzer-parser", "strict", "--analyzer-temperature", "0.6",
                  "--analyzer-top-p", "0.95", "--analyzer-tokens", "512"]
METHODS = {"hintsd-ema": ["--method", "hintsd", "--feedback", "ema", *PAPER_ANALYZER],
           "hintsd-ema-compact": ["--method", "hintsd", "--feedback", "ema"],
           "hintsd-policy": ["--method", "hintsd", "--feedback", "policy", *PAPER_ANALYZER],
           "hintsd-initial": ["--method", "hintsd", "--feedback", "initial", *PAPER_ANALYZER],
           "hintsd-env": ["--method", "hintsd", "--feedback", "env"],
           "hintsd-blank": ["--method", "hintsd", "--feedback", "blank"],
           "hintsd-oracle": ["--method", "hintsd", "--feedback", "oracle"],
           "hintsd-larger": ["--method", "hintsd", "--feedback", "external", *PAPER_ANALYZER, "--analyzer-model",
                             str(larger_analyzer.DEST)],
           "hintsd-larger-tool": ["--method", "hintsd", "--feedback", "external", *PAPER_ANALYZER, "--analyzer-model",
                                  str(larger_analyzer.DEST), "--analyzer-forced", "--analyzer-tool-pick"],
           "hintsd-best": ["--method", "hintsd", "--feedback", "ema", *PAPER_ANALYZER, "--analyzer-forced",
                           "--verify-targets"],
           "hintsd-best-sampled": ["--method", "hintsd", "--feedback", "ema", *PAPER_ANALYZER, "--analyzer-forced",
                                   "--verify-targets", "--verify-samples", "4"],
           "grpo": ["--method", "grpo"], "initial": None}
TRAIN = ["multi_turn_base_93", "multi_turn_base_146", "multi_turn_base_9", "multi_turn_base_66"]
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
           "--tasks", *a.train, "--tasks-per-step", str(a.tasks_per_step), "--rollouts", str(a.rollouts),
           "--max-env-steps", str(a.env_steps), "--max-new-tokens", str(a.new), "--lr", str(a.lr),
           "--seed", str(a.seed), "--steps", str(step), "--model", a.model, "--out", str(run),
           *(["--resume"] if (run / "LATEST").exists() else []), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def analyzer_record(run: Path, by_id: dict) -> str:
    """What the analyzer did over a run's rollouts.jsonl and metrics.jsonl: failed rollouts analysed, of them with
    a target, of those whose first target is the oracle's first wrong step, and whose first target's feedback names
    the function of the oracle's right call; targets, parse failures, dropped."""
    analyzed = with_target = agree = named = right = sampled = 0
    for line in open(run / "rollouts.jsonl"):
        for r in json.loads(line)["rollouts"]:
            if r["reward"] >= 1.0 or not r["steps"]:
                continue
            analyzed += 1
            sampled += sum(hintsd.VERIFIED in tg["feedback"] for tg in r["targets"])
            if r["targets"]:
                with_target += 1
                step, fn = analyzer.oracle_of(by_id[r["task_id"]], [(s["turn"], s["text"]) for s in r["steps"]])
                agree += step is not None and step == r["targets"][0]["step"]
                named, right = named + bool(fn), right + bool(fn and fn in r["targets"][0]["feedback"])
    rows = [json.loads(x) for x in open(run / "metrics.jsonl")]
    dropped = sum(sum(r.get("dropped_by_replay", {}).values()) for r in rows)
    return (f"{analyzed} failed rollouts analysed, {with_target} with a target ({agree} at the oracle's step; "
            f"the first target's feedback names the oracle's function in {right} of {named}); "
            f"{sum(r['targets'] for r in rows)} targets, {sum(r['parse_failures'] for r in rows)} parse failures"
            + (f", {dropped} dropped by replay" if any("dropped_by_replay" in r for r in rows) else "")
            + (f", {sampled} kept by a sampled action" if sampled else ""))


def row_of(out: Path, method: str, by_id: dict) -> str:
    """The summary's row of one method: its curve, held-out before -> after, wall time, and the analyzer's record."""
    at = {(r["step"], r["set"]): r for r in map(json.loads, (out / method / "curve.jsonl").open())}
    trained = " -> ".join(f"{at[s, n]['successes']}/{at[s, n]['rollouts']}" for s, n in sorted(at) if n == "trained")
    held = " -> ".join(f"{r['successes']}/{r['rollouts']}" for (s, n), r in sorted(at.items()) if n == "held-out")
    minutes = out / method / "minutes.txt"
    wall = sum(map(float, minutes.read_text().split())) if minutes.exists() else float("nan")
    line = f"| {method} | {trained} | {held} | {wall:.0f} min |"
    run = out / method / "run"
    if method.startswith("hintsd") and (run / "rollouts.jsonl").exists():
        line += " " + analyzer_record(run, by_id) + " |"
    return line


def run_method(a, out: Path, method: str, points: list[int], extra: list[str]) -> None:
    """Train one method to each evaluation point and evaluate it there, skipping what curve.jsonl already holds."""
    run, curve, step0 = out / method / "run", out / method / "curve.jsonl", out / "step0.jsonl"
    done = {(r["step"], r["set"]) for r in map(json.loads, curve.open())} if curve.exists() else set()
    for step in points if METHODS[method] else [0]:
        if METHODS[method] and step and not (run / f"ckpt-{step:06d}").exists():
            train_to(a, run, method, step, extra)
        for name, ids, split in (("trained", a.train, "train"), ("held-out", a.held_out, "test")):
            if (step, name) in done or (name == "held-out" and step not in (0, a.steps)):
                continue
            # the base model's evaluation is the same for every method (same weights, same seeds): run once
            shared = [r for r in map(json.loads, step0.open()) if r["set"] == name] if step0.exists() else []
            row = shared[0] if step == 0 and shared else {"step": step, "set": name,
                                                          **evaluate(a, run, step, ids, split)}
            if step == 0 and not shared:
                with step0.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            with curve.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{method} step {step} {name}: {row['successes']}/{row['rollouts']} {row['per_task']}", flush=True)


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
    ap.add_argument("--tasks-per-step", type=hintsd.positive_int, default=1, help="trained tasks per update")
    ap.add_argument("--rollouts", type=hintsd.positive_int, default=4, help="training rollouts per task")
    ap.add_argument("--env-steps", type=hintsd.positive_int, default=3)
    ap.add_argument("--new", type=hintsd.positive_int, default=64, help="max new tokens per action")
    ap.add_argument("--seed", type=hintsd.nonneg_int, default=42)
    ap.add_argument("--model", default=hintsd.DEFAULT_MODEL)
    ap.add_argument("--out", default="runs/learn")
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    hintsd.check_model_name(ap, a.model)
    out = hintsd.check_out_dir(ap, a.out)
    # kill: exit through the finally that logs the time; subprocess.run then kills the training process too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if {"hintsd-larger", "hintsd-larger-tool"} & set(a.methods):
        larger_analyzer.build()
    points = sorted({0, *range(a.eval_every, a.steps, a.eval_every), a.steps})
    by_id, summary_rows = {t["id"]: t for t in envs.load_tasks("bfcl", "train", 1)}, {}  # this call's rows
    for method in a.methods:
        (out / method).mkdir(exist_ok=True)
        t0 = time.time()
        try:
            run_method(a, out, method, points, extra)
        finally:  # the wall time of each call, one stopped by Ctrl-C or kill too (a resumed run has several)
            with (out / method / "minutes.txt").open("a") as f:
                f.write(f"{(time.time() - t0) / 60:.1f}\n")
        summary_rows[method] = row_of(out, method, by_id)
        print(summary_rows[method], flush=True)
    summary = [summary_rows.get(m) or row_of(out, m, by_id) for m in METHODS if (out / m / "curve.jsonl").exists()]
    head = ["| method | trained: success at the evaluation steps | held-out: before -> after | wall time (all calls) |"
            " analyzer |", "|---|---|---|---|---|"]
    (out / "summary.md").write_text("\n".join(head + summary) + "\n")
    print("\n".join(head + summary))


if __name__ == "__main__":
    main()
