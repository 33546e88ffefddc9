"""Feedback placement (paper Table 2): does the same hindsight feedback help more right before the target action
than at the start of a fresh rollout?

    python bench/placement.py [--split test] [--limit 8] [--n 2] [--feedback policy] [--out runs/placement]

For each task: one base rollout without feedback. If it fails, the hindsight analyzer (k = 1) names one target
step and one feedback (greedy, the Single prompt). Then four conditions, n rollouts each, sampled in one batch:
  start           a fresh rollout; the feedback message right after the task
  start-none      a fresh rollout without feedback (the pair of `start`)
  target          the failed rollout's actions before the target step replayed through a fresh env (forced, not
                  sampled), the feedback message right before the target action, then the policy goes on
  target-none     the same replayed prefix without feedback (the pair of `target`)
The feedback stays in the context. Prints the success rate of each condition, the gains (start - start-none,
target - target-none) and target minus start, in points; writes OUT/pairs.jsonl and OUT/summary.json.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
import hintsd  # noqa: E402

CONDITIONS = ("start", "start-none", "target", "target-none")


def interventions(model, tok, task: dict, base: hintsd.Trajectory, step: int, feedback: str, n: int,
                  cfg: hintsd.SamplingConfig, a) -> dict[str, list[float]]:
    """Rewards of the n rollouts of each condition for one failed base rollout and its (step, feedback).
    Rollout i of every condition has the same seed, so the paired conditions differ only by the feedback."""
    prefix = [s.text for s in base.steps[:step]]
    plan = {"start": ([], (0, feedback)), "start-none": ([], None),
            "target": (prefix, (step, feedback)), "target-none": (prefix, None)}
    rows = [(c, i) for c in CONDITIONS for i in range(n)]
    make = lambda: envs.make_env(task, a.action_format, a.max_env_steps, a.action_protocol)  # noqa: E731
    trajs = hintsd.rollout(model, tok, [make() for _ in rows], cfg, [hintsd.seed_of(a.seed, task["id"], i)
                                                                     for _, i in rows],
                           forced=[plan[c][0] for c, _ in rows], hints=[plan[c][1] for c, _ in rows])
    out = {c: [] for c in CONDITIONS}
    for (c, _), t in zip(rows, trajs):
        out[c].append(t.reward)
    return out


def summarize(pairs: list[dict]) -> dict:
    """Success rates (%) per condition over all rollouts, the two gains and target minus start."""
    rate = {c: 100 * sum(r for p in pairs for r in p["rewards"][c]) / max(sum(len(p["rewards"][c]) for p in pairs), 1)
            for c in CONDITIONS}
    gain_start, gain_target = rate["start"] - rate["start-none"], rate["target"] - rate["target-none"]
    return {"pairs": len(pairs), "success": rate, "gain_start": gain_start, "gain_target": gain_target,
            "target_minus_start": gain_target - gain_start}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="bfcl", choices=envs.BENCHES)
    ap.add_argument("--split", default="test", help="task split (as in eval.py)")
    ap.add_argument("--tasks", nargs="+", metavar="ID", help="only these task ids of the split")
    ap.add_argument("--limit", type=hintsd.positive_int, default=None, help="only the first N tasks")
    ap.add_argument("--turns", type=hintsd.positive_int, help="cut every BFCL task to its first K user turns")
    ap.add_argument("--n", type=hintsd.positive_int, default=2, help="rollouts per condition")
    ap.add_argument("--feedback", default="policy", choices=["policy", "env", "oracle"],
                    help="who writes the one feedback: the base policy as analyzer, the raw env output, or the "
                         "BFCL ground-truth oracle")
    ap.add_argument("--model", default=hintsd.DEFAULT_MODEL)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--action-format", default="json", choices=envs.ACTION_FORMATS)
    ap.add_argument("--action-protocol", default="authors", choices=envs.ACTION_PROTOCOLS)
    ap.add_argument("--analyzer-prompt", default="authors", choices=["authors", "compact"])
    ap.add_argument("--analyzer-parser", default="strict", choices=["strict", "lenient"])
    ap.add_argument("--temperature", type=hintsd.nonneg_float, default=0.6)
    ap.add_argument("--max-new-tokens", type=hintsd.positive_int, default=1024, help="per assistant action")
    ap.add_argument("--analyzer-tokens", type=hintsd.positive_int, default=512)
    ap.add_argument("--max-len", type=hintsd.positive_int, default=24576)
    ap.add_argument("--max-env-steps", type=hintsd.positive_int, default=None, help="assistant steps per episode")
    ap.add_argument("--seed", type=hintsd.nonneg_int, default=42)
    ap.add_argument("--out", default="runs/placement")
    a = ap.parse_args()
    if a.feedback == "oracle" and a.bench != "bfcl":
        ap.error("--feedback oracle needs BFCL ground truth")
    hintsd.check_device(ap, a.device)
    hintsd.check_model_name(ap, a.model)
    hintsd.check_out_dir(ap, a.out)
    try:
        tasks = envs.load_tasks(a.bench, a.split, a.turns, a.tasks)[: a.limit]
    except ValueError as e:
        ap.error(str(e))
    model, tok = hintsd.load_model(a.model, a.device)
    cfg = hintsd.SamplingConfig(a.max_new_tokens, a.temperature, 1.0, a.max_len)
    analyzer = hintsd.AnalyzerConfig(a.feedback, a.analyzer_prompt,
                                     a.analyzer_parser, a.analyzer_tokens, 0.0, 1.0, max_len=a.max_len)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs, skipped = [], {"base_succeeded": 0, "no_target": 0}
    with open(out / "pairs.jsonl", "w") as f:
        for task in tqdm(tasks, desc="placement", unit="task"):
            env = envs.make_env(task, a.action_format, a.max_env_steps, a.action_protocol)
            [base] = hintsd.rollout(model, tok, [env], cfg, [hintsd.seed_of(a.seed, task["id"], "base")])
            if base.reward >= 1.0 or not base.steps:
                skipped["base_succeeded"] += base.reward >= 1.0
                continue
            h = hintsd.select_targets(model, tok, [base], analyzer, "single", a.bench, {}, {task["id"]: task},
                                      a.action_format, a.action_protocol, a.seed)
            if not h.targets:
                skipped["no_target"] += 1
                continue
            tg = h.targets[0]
            rewards = interventions(model, tok, task, base, tg.step, tg.feedback, a.n, cfg, a)
            pair = {"task_id": task["id"], "target_step": tg.step + 1, "steps": len(base.steps),
                    "feedback": tg.feedback, "rewards": rewards}
            pairs.append(pair)
            f.write(json.dumps(pair) + "\n")
            f.flush()
            tqdm.write(f"{task['id']}: target step {tg.step + 1}/{len(base.steps)}, rewards {rewards}")
    summary = {**summarize(pairs), **skipped, "tasks": len(tasks), "feedback": a.feedback, "n": a.n,
               "max_env_steps": a.max_env_steps, "max_new_tokens": a.max_new_tokens}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    s = summary["success"]
    print(f"\n{len(pairs)} failed base rollouts with a target ({skipped['base_succeeded']} base successes, "
          f"{skipped['no_target']} without a parsable target), {a.n} rollouts per condition")
    print("| placement | with feedback | without | gain |\n|---|---|---|---|")
    print(f"| start | {s['start']:.2f} | {s['start-none']:.2f} | {summary['gain_start']:+.2f} |")
    print(f"| target turn | {s['target']:.2f} | {s['target-none']:.2f} | {summary['gain_target']:+.2f} |")
    print(f"| target - start | | | {summary['target_minus_start']:+.2f} |")


if __name__ == "__main__":
    main()
