"""Evaluate a policy on BFCL v3 multi-turn: k rollouts per task, Avg@k and Best@k (the paper's metrics).

    python eval.py --bench bfcl --split test --k 4 --limit 5 --out runs/eval-initial
    python eval.py --compare runs/eval/initial runs/eval/hintsd   # Table 1 layout, from saved summaries
    python eval.py --turns runs/hintsd                             # target-step distribution per epoch (Fig. 2)

Writes DIR/trajectories.jsonl (one line per rollout: messages, token ids, steps, reward) and DIR/summary.json.
"""
import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

import envs
import hintsd


def pass_at_k_summary(results: list[dict]) -> dict:
    """results: one dict per rollout with task_id, category, reward.
    Avg@k = mean success over all rollouts; Best@k = share of tasks where any of the k rollouts succeeded."""
    by_task = defaultdict(list)
    cat_of = {}
    for r in results:
        by_task[r["task_id"]].append(r["reward"])
        cat_of[r["task_id"]] = r["category"]

    def summarize(task_ids):
        runs = [x for t in task_ids for x in by_task[t]]
        return {"tasks": len(task_ids), "rollouts": len(runs),
                "avg_at_k": 100 * sum(runs) / max(len(runs), 1),
                "best_at_k": 100 * sum(max(by_task[t]) > 0 for t in task_ids) / max(len(task_ids), 1)}

    out = {"overall": summarize(list(by_task))}
    for cat in sorted(set(cat_of.values())):
        out[cat] = summarize([t for t in by_task if cat_of[t] == cat])
    return out


def evaluate(model, tok, tasks: list[dict], k: int, cfg: hintsd.SamplingConfig, action_format: str = "json",
             max_env_steps: int | None = None, seed: int = 0, out_dir: Path | None = None, desc: str = "eval") -> dict:
    """k rollouts per task, batched per task so the shared prompt is prefilled once. Returns the summary."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    results, started = [], time.time()
    sink = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        sink = open(out_dir / "trajectories.jsonl", "w")
    bar = tqdm(tasks, desc=desc, unit="task")
    tokbar = tqdm(desc="  sampled", unit="tok", leave=False)
    for task in bar:
        trajs = hintsd.rollout(model, tok, [envs.make_env(task, action_format, max_env_steps) for _ in range(k)], cfg, gen, tokbar)
        for t in trajs:
            results.append({"task_id": t.task_id, "category": t.category, "reward": t.reward})
            if sink:
                sink.write(json.dumps(t.to_json()) + "\n")
                sink.flush()
        s = pass_at_k_summary(results)["overall"]
        bar.set_postfix(avg=f"{s['avg_at_k']:.1f}", best=f"{s['best_at_k']:.1f}")
    tokbar.close()
    summary = {**pass_at_k_summary(results), "bench": tasks[0].get("bench", "bfcl") if tasks else "bfcl", "k": k,
               "action_format": action_format, "max_env_steps": max_env_steps, "seconds": round(time.time() - started, 1)}
    if sink:
        sink.close()
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def compare(dirs: list[str]) -> str:
    """The paper's Table 1 layout from saved eval summaries: one row per method (the run dir's name; runs of the
    same name under different parents, e.g. runs/bfcl/hintsd and runs/appworld/hintsd, share a row), Avg@k and
    Best@k per benchmark."""
    rows: dict[str, dict] = {}
    for d in dirs:
        if not (Path(d) / "summary.json").exists():
            raise SystemExit(f"--compare: {d} has no summary.json (not an eval.py run dir, or the eval did not finish)")
        s = json.loads((Path(d) / "summary.json").read_text())
        rows.setdefault(Path(d).name, {})[s.get("bench", "bfcl")] = s
    benches = [b for b in envs.BENCHES if any(b in r for r in rows.values())]
    head = "| method | " + " | ".join(f"{b} Avg@k | {b} Best@k | {b} tasks x k" for b in benches) + " |"
    lines = [head, "|---|" + "---|---|---|" * len(benches)]
    for name, r in rows.items():
        cells = []
        for b in benches:
            o = r[b]["overall"] if b in r else None
            cells += [f"{o['avg_at_k']:.2f}", f"{o['best_at_k']:.2f}", f"{o['tasks']} x {r[b]['k']}"] if o else ["-"] * 3
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TURN_BINS = ((1, 3), (4, 8), (9, None))  # the paper's bins of the target's assistant step (its "turn")


def turn_distribution(dirs: list[str]) -> str:
    """Share of distillation targets whose action is assistant step 1-3, 4-8 or 9+, per epoch and overall,
    from each training run's metrics.jsonl (field target_steps)."""
    lines = ["| run | epoch | targets | steps 1-3 | steps 4-8 | steps 9+ |", "|---|---|---|---|---|---|"]
    for d in dirs:
        if not (Path(d) / "metrics.jsonl").exists():
            raise SystemExit(f"--turns: {d} has no metrics.jsonl (not a hintsd.py run dir)")
        rows = [json.loads(x) for x in open(Path(d) / "metrics.jsonl")]
        by_epoch: dict = defaultdict(list)
        for r in rows:
            by_epoch[r["epoch"]] += r.get("target_steps", [])
        for epoch, steps in [*sorted(by_epoch.items()), ("all", [s for v in by_epoch.values() for s in v])]:
            share = [100 * sum(lo <= s and (hi is None or s <= hi) for s in steps) / max(len(steps), 1)
                     for lo, hi in TURN_BINS]
            lines.append(f"| {Path(d).name} | {epoch} | {len(steps)} | " + " | ".join(f"{x:.1f}%" for x in share) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="bfcl", choices=envs.BENCHES, help="benchmark")
    ap.add_argument("--split", default="test", choices=envs.SPLITS + ("dev", "test_normal", "test_challenge"),
                    help="BFCL: the paper split (seed 42); AppWorld: its own splits (eval = dev, test = test_normal)")
    ap.add_argument("--k", type=int, default=4, help="rollouts per task (Avg@k / Best@k)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N tasks of the split")
    ap.add_argument("--model", default=hintsd.DEFAULT_MODEL, help="HF id, local dir, or 'embedded'")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--action-format", default="json", choices=envs.ACTION_FORMATS,
                    help="json: the chat template's <tool_call> format; python: BFCL's [f(a=1)] list")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--max-new-tokens", type=int, default=256, help="per assistant action")
    ap.add_argument("--max-len", type=int, default=24576, help="context limit of one trajectory in tokens")
    ap.add_argument("--max-env-steps", type=int, default=None, help="assistant steps per episode (BFCL 20, AppWorld 40)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output dir (default runs/eval-<split>)")
    ap.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                    help="print the Table-1 layout (Avg@k, Best@k per method and benchmark) of saved eval runs and exit")
    ap.add_argument("--turns", nargs="+", metavar="TRAIN_DIR",
                    help="print the share of targets at assistant steps 1-3, 4-8, 9+ per epoch of training runs and exit")
    args = ap.parse_args(argv)
    if args.compare or args.turns:
        print(compare(args.compare) if args.compare else turn_distribution(args.turns))
        return
    tasks = envs.load_tasks(args.bench, args.split)[: args.limit]
    model, tok = hintsd.load_model(args.model, args.device, getattr(torch, args.dtype) if args.dtype else None)
    cfg = hintsd.SamplingConfig(args.max_new_tokens, args.temperature, 1.0, args.max_len)
    out = Path(args.out or f"runs/eval-{args.split}")
    summary = evaluate(model, tok, tasks, args.k, cfg, args.action_format, args.max_env_steps, args.seed, out)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
