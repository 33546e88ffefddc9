"""Evaluate a policy on BFCL v3 multi-turn: k rollouts per task, Avg@k and Best@k (the paper's metrics).

    python eval.py --bench bfcl --split test --k 4 --limit 5 --out runs/eval/initial
    python eval.py --turns 1 --out runs/eval-1turn                  # every task cut to its first user turn
    python eval.py --compare runs/eval/initial runs/eval/hintsd     # Table 1 layout, from saved summaries
    python eval.py --target-steps runs/hintsd                       # target-step distribution per epoch (Fig. 2)
    python eval.py --plot runs/hintsd runs/sdpo                     # success / KL / target-step PNGs into plots/
    torchrun --nproc_per_node=4 eval.py ...                         # tasks sharded by rank, joined on rank 0

Settings not given on the command line come from hintsd.PRESETS (--preset; auto = cpu on a CPU device, else paper).
Writes DIR/trajectories.jsonl (one line per rollout: messages, token ids, steps, reward) and DIR/summary.json
(the metrics and every resolved setting). Both are written under a .tmp name and renamed at the very end, the
summary last, so a DIR with summary.json always holds one complete eval.
"""
import argparse
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

import envs
import hintsd

EVAL_SETTINGS = ("model", "max_new_tokens", "max_len", "max_env_steps", "action_protocol", "temperature", "seed")


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
             max_env_steps: int | None = None, seed: int = 0, out_dir: Path | None = None, desc: str = "eval",
             protocol: str = "authors", settings: dict | None = None) -> dict:
    """k rollouts per task, batched per task so the shared prompt is prefilled once; rollout r of a task is seeded
    by (seed, task id, r), so results do not depend on the order or grouping of tasks. Returns the summary.
    With out_dir: trajectories stream to trajectories.jsonl.tmp; only a finished eval renames it and writes
    summary.json (last). An old summary.json is removed first, so old and new results are never mixed."""
    results, started = [], time.time()
    tmp = sink = None
    if out_dir is not None:  # a full disk or a read-only dir, here or below: one line naming the file
        tmp = out_dir / "trajectories.jsonl.tmp"
        with hintsd.writing(tmp):
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "summary.json").unlink(missing_ok=True)
            sink = open(tmp, "w")
    bar = tqdm(tasks, desc=desc, unit="task")
    tokbar = tqdm(desc="  sampled", unit="tok", leave=False)
    try:
        for task in bar:
            envs_list = [envs.make_env(task, action_format, max_env_steps, protocol=protocol) for _ in range(k)]
            seeds = [hintsd.seed_of(seed, task["id"], r) for r in range(k)]
            for t in hintsd.rollout(model, tok, envs_list, cfg, seeds, tokbar):
                results.append({"task_id": t.task_id, "category": t.category, "reward": t.reward})
                if sink:
                    with hintsd.writing(tmp):
                        sink.write(json.dumps(t.to_json()) + "\n")
                        sink.flush()
            s = pass_at_k_summary(results)["overall"]
            bar.set_postfix(avg=f"{s['avg_at_k']:.1f}", best=f"{s['best_at_k']:.1f}")
    except BaseException:
        if tmp:
            print(f"[eval] stopped after {len(results)} rollouts: they are kept in {tmp}; no summary.json written",
                  file=sys.stderr)
        raise
    finally:
        tokbar.close()
        bar.close()
        if sink:  # (a close after a failed write fails again: the same one line)
            with hintsd.writing(tmp):
                sink.close()
    summary = {**pass_at_k_summary(results), "bench": tasks[0].get("bench", "bfcl") if tasks else "bfcl", "k": k,
               "action_format": action_format, "action_protocol": protocol, "max_env_steps": max_env_steps,
               **(settings or {}), "seconds": round(time.time() - started, 1)}
    if out_dir is not None:
        with hintsd.writing(out_dir / "summary.json.tmp", f"; the rollouts are in {tmp}"):
            (out_dir / "summary.json.tmp").write_text(json.dumps(summary, indent=2))
            os.replace(tmp, out_dir / "trajectories.jsonl")
            os.replace(out_dir / "summary.json.tmp", out_dir / "summary.json")
    return summary


# ----------------------------------------------------------------------------- reading saved runs
def warn(msg: str) -> None:
    """A warning on stderr; returns None, so a reader can `return warn(...)` for a file it skips."""
    print(f"warning: {msg}", file=sys.stderr)


def read_json(path: Path) -> dict | None:
    """The JSON object in path, or None (with a warning naming the file) if it is missing or malformed."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return warn(f"{path}: no such file, skipped")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return warn(f"{path}: unreadable or not valid JSON ({e}), skipped")
    if not isinstance(obj, dict):
        return warn(f"{path}: expected a JSON object, got {type(obj).__name__}, skipped")
    return obj


def read_jsonl(path: Path, need: dict) -> list[dict] | None:
    """The rows of a JSONL file that are objects whose fields `need` (name -> type or tuple of types) are present
    and well typed; every other line (e.g. a half-written last one) is skipped with a warning. None: no file."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        warn(f"{path}: unreadable ({e})")
        return []
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            warn(f"{path}:{i}: not valid JSON (half-written?), line skipped")
            continue
        bad = [k for k, t in need.items() if not isinstance(row, dict) or not isinstance(row.get(k), t)
               or isinstance(row.get(k), bool)]
        if bad:
            warn(f"{path}:{i}: missing or malformed {', '.join(bad)}, line skipped")
            continue
        rows.append(row)
    return rows


def run_name(d: str) -> str:
    return Path(d).resolve().name


def compare(dirs: list[str]) -> str | None:
    """The paper's Table 1 layout from saved eval summaries: one row per method (the run dir's name; runs of the
    same name under different parents, e.g. runs/bfcl/hintsd and runs/appworld/hintsd, share a row), Avg@k and
    Best@k per benchmark. Malformed summaries are skipped with a warning; None if none is usable."""
    rows: dict[str, dict] = {}
    for d in dirs:
        path = Path(d) / "summary.json"
        s = read_json(path)
        if s is None:
            continue
        o = s.get("overall")
        if not isinstance(o, dict) or any(not isinstance(o.get(f), (int, float)) for f in ("avg_at_k", "best_at_k")):
            warn(f"{path}: no 'overall' with avg_at_k and best_at_k (not an eval.py summary), skipped")
            continue
        rows.setdefault(run_name(d), {})[s.get("bench", "bfcl")] = s
    if not rows:
        return None
    benches = [b for b in envs.BENCHES if any(b in r for r in rows.values())]
    head = "| method | " + " | ".join(f"{b} Avg@k | {b} Best@k | {b} tasks x k" for b in benches) + " |"
    lines = [head, "|---|" + "---|---|---|" * len(benches)]
    for name, r in rows.items():
        cells = []
        for b in benches:
            o = r[b]["overall"] if b in r else None
            cells += ([f"{o['avg_at_k']:.2f}", f"{o['best_at_k']:.2f}", f"{o.get('tasks', '?')} x {r[b].get('k', '?')}"]
                      if o else ["-"] * 3)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TURN_BINS = ((1, 3), (4, 8), (9, None))  # the paper's bins of the target's assistant step (its "turn")
BIN_NAMES = ("steps 1-3", "steps 4-8", "steps 9+")


def step_shares(steps: list[int]) -> list[float]:
    """Share in % of target steps in each of TURN_BINS."""
    return [100 * sum(lo <= s and (hi is None or s <= hi) for s in steps) / max(len(steps), 1) for lo, hi in TURN_BINS]


def target_steps_of(row: dict) -> list[int]:
    steps = row.get("target_steps", [])
    return [s for s in steps if isinstance(s, int)] if isinstance(steps, list) else []


def target_step_table(dirs: list[str]) -> str | None:
    """Share of distillation targets whose action is assistant step 1-3, 4-8 or 9+, per epoch and overall,
    from each training run's metrics.jsonl (field target_steps). Bad files / lines are skipped with a warning."""
    lines = ["| run | epoch | targets | " + " | ".join(BIN_NAMES) + " |", "|---|---|---|---|---|---|"]
    for d in dirs:
        path = Path(d) / "metrics.jsonl"
        rows = read_jsonl(path, {"epoch": int})
        if not rows:
            warn(f"{path}: {'no such file' if rows is None else 'no usable rows'}, skipped")
            continue
        by_epoch: dict = defaultdict(list)
        for r in rows:
            by_epoch[r["epoch"]] += target_steps_of(r)
        for epoch, steps in [*sorted(by_epoch.items()), ("all", [s for v in by_epoch.values() for s in v])]:
            cells = " | ".join(f"{x:.1f}%" for x in step_shares(steps))
            lines.append(f"| {run_name(d)} | {epoch} | {len(steps)} | {cells} |")
    return "\n".join(lines) if len(lines) > 2 else None


# ----------------------------------------------------------------------------- plots
NUM = (int, float)


def load_run(d: str) -> dict | None:
    """A training run's metrics.jsonl and curve.jsonl rows (malformed lines skipped); None if it has neither. A
    learning-run dir of bench/learn.py holds curve.jsonl beside its training run in run/."""
    run = Path(d) / "run" if (Path(d) / "run" / "metrics.jsonl").exists() else Path(d)
    metrics = read_jsonl(run / "metrics.jsonl", {"step": NUM}) or []
    curve = read_jsonl(Path(d) / "curve.jsonl", {"step": NUM, "set": str, "successes": int, "rollouts": int}) or []
    curve = [r for r in curve if r["set"] in ("trained", "held-out") and r["rollouts"] > 0]
    if not metrics and not curve:
        return warn(f"{d}: no usable metrics.jsonl or curve.jsonl, skipped")
    return {"name": run_name(d), "dir": Path(d), "metrics": metrics, "curve": curve}


def success_curve(rows: list[dict], which: str) -> tuple[list, list]:
    """(steps, success rate in %) of one evaluation set; evaluations at the same step are pooled."""
    pooled: dict = defaultdict(lambda: [0, 0])
    for r in rows:
        if r["set"] == which:
            pooled[r["step"]][0] += r["successes"]
            pooled[r["step"]][1] += r["rollouts"]
    steps = sorted(pooled)
    return steps, [100 * pooled[s][0] / pooled[s][1] for s in steps]


def plot_runs(runs: list[dict], out: Path) -> list[Path]:
    """success.png, kl.png, target_steps.png in out; returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    palette = [f"C{i}" for i in range(10)] if len(runs) <= 10 else list(plt.cm.tab20.colors)  # a colour per run
    colors = {r["name"]: palette[i % len(palette)] for i, r in enumerate(runs)}
    paths = []

    # success rate: trained / held-out panels from curve.jsonl, else the training success rate from metrics.jsonl
    with_curve = [r for r in runs if r["curve"]]
    panels = ("trained", "held-out") if with_curve else ("training rollouts",)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, which in zip(axes[0], panels):
        for r in with_curve or runs:
            if with_curve:
                steps, rate = success_curve(r["curve"], which)
            else:
                pts = [(m["step"], 100 * m["success_rate"]) for m in r["metrics"]
                       if isinstance(m.get("success_rate"), NUM)]
                steps, rate = [p[0] for p in pts], [p[1] for p in pts]
            if len(steps) == 1:  # evaluated once (the initial model): a flat line
                ax.axhline(rate[0], ls=":", color=colors[r["name"]], label=f"{r['name']} (step {steps[0]})")
            elif steps:
                ax.plot(steps, rate, marker="o", ms=3, color=colors[r["name"]], label=r["name"])
        ax.set(title=which, xlabel="step", ylabel="success rate (%)", ylim=(-3, 103))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("success rate" if with_curve else "training success rate (no run has a curve.jsonl)")
    paths.append(save(fig, out / "success.png"))

    # targeted KL before the update (solid) and after it (dashed)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    with_kl = [r for r in runs if any(isinstance(m.get("kl"), NUM) for m in r["metrics"])]
    for r in with_kl:
        for key, style, label in (("kl", "-", r["name"]), ("kl_after", "--", f"{r['name']} (after update)")):
            pts = [(m["step"], m[key]) for m in r["metrics"]  # a step without targets has no KL to show
                   if isinstance(m.get(key), NUM) and m.get("tokens_supervised") != 0]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", ms=3, color=colors[r["name"]], label=label)
    ax.set(xlabel="step", ylabel="KL(student || teacher) on targets",
           title="targeted KL" if with_kl else "targeted KL (no run logged a KL)")
    ax.grid(alpha=0.3)
    if with_kl:
        ax.legend(fontsize=8)
    paths.append(save(fig, out / "kl.png"))

    # target-step distribution: one group of three bars (steps 1-3, 4-8, 9+) per run with targets
    steps_of = {r["name"]: [s for m in r["metrics"] for s in target_steps_of(m)] for r in runs}
    steps_of = {name: steps for name, steps in steps_of.items() if steps}
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(steps_of) + 2), 3.8))
    width = 0.8 / len(TURN_BINS)
    for j, name in enumerate(BIN_NAMES):
        shares = [step_shares(steps)[j] for steps in steps_of.values()]
        bars = ax.bar([i + (j - 1) * width for i in range(len(steps_of))], shares, width, label=name, color=f"C{j}")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(steps_of)), [f"{name}\n({len(s)} targets)" for name, s in steps_of.items()], fontsize=8)
    ax.set(ylabel="share of targets (%)", ylim=(0, 110),
           title="assistant step of the distillation targets" if steps_of else "no run logged target steps")
    if steps_of:
        ax.legend(fontsize=8)
    paths.append(save(fig, out / "target_steps.png"))
    return paths


def save(fig, path: Path) -> Path:
    """Write fig as a small PNG (100 dpi), integer steps on every x axis that shows steps."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    for ax in fig.axes:
        if ax.get_xlabel() == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- command line
def turns_k(text: str) -> int:
    """argparse type of --turns: K >= 1 (the old --turns RUN_DIR table is now --target-steps)."""
    try:
        return hintsd.positive_int(text)
    except argparse.ArgumentTypeError as e:
        if not text.lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"{e}; --turns K cuts tasks to K user turns, "
                                             "the target-step table of run dirs is --target-steps RUN_DIR") from None
        raise


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="bfcl", choices=envs.BENCHES, help="benchmark")
    ap.add_argument("--split", default="test", choices=envs.SPLITS + ("dev", "test_normal", "test_challenge"),
                    help="BFCL: the paper split (seed 42); AppWorld: its own splits (eval = dev, test = test_normal)")
    ap.add_argument("--k", type=hintsd.positive_int, default=4, help="rollouts per task (Avg@k / Best@k)")
    ap.add_argument("--limit", type=hintsd.positive_int, default=None, help="evaluate only the first N tasks")
    ap.add_argument("--tasks", nargs="+", metavar="ID", help="evaluate only these task ids of the split (each once)")
    ap.add_argument("--turns", type=turns_k, default=None, metavar="K",
                    help="BFCL: cut every task to its first K user turns")
    ap.add_argument("--model", default=None, help=f"HF id, local dir, or 'embedded' (preset paper: "
                                                   f"{hintsd.PAPER_MODEL}; cpu: embedded)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto = bfloat16 on CUDA and on CPUs with AMX or AVX512-BF16, else float32")
    ap.add_argument("--preset", default="auto", choices=("auto", *hintsd.PRESETS),
                    help="fills every setting below not given: paper = the authors' eval (their model, 1024 new "
                         "tokens, max_len 24576, the bench's step cap, authors' protocol, temperature 0.6, seed 42); "
                         "auto = cpu on a CPU device, else paper")
    ap.add_argument("--action-format", default="json", choices=envs.ACTION_FORMATS,
                    help="json: the chat template's <tool_call> format; python: BFCL's [f(a=1)] list")
    ap.add_argument("--action-protocol", default=None, choices=envs.ACTION_PROTOCOLS,
                    help="how actions and tool answers are framed (authors: as in the paper's code)")
    ap.add_argument("--temperature", type=hintsd.nonneg_float, default=None, help="0 = greedy")
    ap.add_argument("--max-new-tokens", type=hintsd.positive_int, default=None, help="per assistant action")
    ap.add_argument("--max-len", type=hintsd.positive_int, default=None, help="context limit of a trajectory (tokens)")
    ap.add_argument("--max-env-steps", type=hintsd.positive_int, default=None,
                    help="assistant steps per episode (preset paper: the bench's cap, BFCL 20, AppWorld 40)")
    ap.add_argument("--seed", type=hintsd.nonneg_int, default=None)
    ap.add_argument("--out", default=None, help="output dir (default runs/eval-<split>); must be new or empty")
    ap.add_argument("--overwrite", action="store_true", help="allow a non-empty --out (its results are replaced)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                      help="print the Table-1 layout (Avg@k, Best@k per method and benchmark) of saved evals and exit")
    mode.add_argument("--target-steps", nargs="+", metavar="RUN_DIR",
                      help="print the share of targets at assistant steps 1-3, 4-8, 9+ per epoch of training runs")
    mode.add_argument("--plot", nargs="+", metavar="RUN_DIR",
                      help="write success.png, kl.png, target_steps.png of training runs and exit")
    ap.add_argument("--plot-out", default=None, metavar="DIR",
                    help="where --plot writes, printing each path (default: plots/ in the current directory)")
    args = ap.parse_args(argv)
    if args.plot_out is not None and not args.plot:
        ap.error("--plot-out goes with --plot RUN_DIR...")
    if args.compare or args.target_steps or args.plot:
        return ap, args
    # an eval: every setting resolved and every flag checked before any task or model is loaded
    args.preset = args.preset if args.preset != "auto" else ("cpu" if args.device == "cpu" else "paper")
    for key in EVAL_SETTINGS:
        if getattr(args, key) is None:
            setattr(args, key, hintsd.PRESETS[args.preset][key])
    if args.bench == "bfcl" and args.action_protocol == "authors" and args.action_format != "json":
        ap.error(f"--action-format {args.action_format} needs --action-protocol friendly (the authors' protocol "
                 f"takes <tool_call> JSON only)")
    if args.turns is not None and args.bench != "bfcl":
        ap.error(f"--turns cuts BFCL tasks by user turn; {args.bench} tasks have one instruction, drop --turns")
    hintsd.check_model_name(ap, args.model)
    hintsd.check_device(ap, args.device)
    args.out = args.out or f"runs/eval-{args.split}"
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        ap.error(f"--out {args.out} is not empty; name a fresh directory, or pass --overwrite to replace its results")
    hintsd.check_out_dir(ap, args.out)
    return ap, args


def main(argv=None):
    ap, args = parse_args(argv)
    if args.compare or args.target_steps:
        text = compare(args.compare) if args.compare else target_step_table(args.target_steps)
        if text is None:
            ap.error(f"--{'compare' if args.compare else 'target-steps'}: no usable "
                       f"{'summary.json' if args.compare else 'metrics.jsonl'} in the given dirs")
        print(text)
        return
    if args.plot:
        # files are skipped without a word: `--plot runs/learn/*` also matches runs/learn/summary.md
        runs = [r for r in map(load_run, (d for d in args.plot if not Path(d).is_file())) if r is not None]
        if not runs:
            ap.error("--plot: no usable metrics.jsonl or curve.jsonl in the given dirs")
        out = hintsd.check_out_dir(ap, args.plot_out or "plots", "--plot-out")
        for p in plot_runs(runs, out):
            print(p)
        return
    try:
        tasks = envs.load_tasks(args.bench, args.split, args.turns, args.tasks)[: args.limit]
    except ValueError as e:
        ap.error(str(e))
    if not tasks:
        ap.error(f"--split {args.split}: no {args.bench} tasks")
    ddp, rank, world, device = hintsd.init_distributed(args.device)  # under torchrun: each rank its share of tasks
    model, tok = hintsd.load_model(args.model, device, None if args.dtype == "auto" else getattr(torch, args.dtype))
    cfg = hintsd.SamplingConfig(args.max_new_tokens, args.temperature, 1.0, args.max_len)
    settings = {"split": args.split, "limit": args.limit, "turns": args.turns,
                "device": args.device, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "preset": args.preset, "top_p": cfg.top_p, **{key: getattr(args, key) for key in EVAL_SETTINGS}}
    out = Path(args.out)
    if ddp and rank == 0:
        (out / "summary.json").unlink(missing_ok=True)
    summary = evaluate(model, tok, tasks[rank::world], args.k, cfg, args.action_format, args.max_env_steps, args.seed,
                       out / f".rank-{rank}" if ddp else out, protocol=args.action_protocol, settings=settings)
    if ddp:  # every rank has written its part: rank 0 joins them in task order, as one process would have
        torch.distributed.barrier()
        if rank == 0:
            summary = join_ranks(out, world, [t["id"] for t in tasks], summary)
        torch.distributed.destroy_process_group()
    if rank == 0:
        print(json.dumps(summary, indent=2))


def join_ranks(out: Path, world: int, task_ids: list[str], like: dict) -> dict:
    """The ranks' trajectories (out/.rank-R/) in task order, written and summarised as by one process; the rank
    dirs are removed once the joined files are in place."""
    order = {t: i for i, t in enumerate(task_ids)}
    rows = [json.loads(x) for r in range(world) for x in open(out / f".rank-{r}" / "trajectories.jsonl")]
    rows.sort(key=lambda x: order[x["task_id"]])  # stable: a task's rollouts keep their order
    summary = {**like, **pass_at_k_summary([{k: x[k] for k in ("task_id", "category", "reward")} for x in rows]),
               "processes": world}
    with hintsd.writing(out / "trajectories.jsonl.tmp", f"; each rank's rollouts are in {out}/.rank-*"):
        (out / "trajectories.jsonl.tmp").write_text("".join(json.dumps(x) + "\n" for x in rows))
        (out / "summary.json.tmp").write_text(json.dumps(summary, indent=2))
        os.replace(out / "trajectories.jsonl.tmp", out / "trajectories.jsonl")
        os.replace(out / "summary.json.tmp", out / "summary.json")
    for r in range(world):
        shutil.rmtree(out / f".rank-{r}")
    return summary


if __name__ == "__main__":
    sys.exit(main())
