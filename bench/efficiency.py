"""Efficiency table (paper Figure 2, middle and right): one training step of every method, same tasks and seed.

    python bench/efficiency.py [--methods hintsd sdpo openclaw grpo sft] [--out runs/efficiency] [-- HINTSD ARGS]

Each method runs `hintsd.py --method M --steps 1 --no-after-check` in its own process (so each peak memory is
its own), with the same seed, so all of them start from the same weights and sample the same rollouts (every
rollout's draws are seeded by (seed, step, task, n)). SFT trains offline on ground-truth replays: no rollouts.
Arguments after `--` go to every hintsd.py call (say `--model random:DIR --device cuda`); without them the
defaults apply (CPU: the cpu preset and the embedded model; a GPU: the paper preset and its model,
Qwen/Qwen3-4B-Instruct-2507, whose weights must be reachable). Prints a markdown table of the step time split
into rollout, feedback (analyzer / judge / ground-truth replay) and update, the peak memory (CUDA: torch's peak
allocation; CPU: the process's peak RSS, model included) and the tokens supervised, each also as a ratio to
HINT-SD, from each run's OUT/M/metrics.jsonl.
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("hintsd", "sdpo", "openclaw", "grpo", "sft")


def run_method(method: str, out: Path, extra: list[str]) -> dict:
    """One training step of `method` in a fresh process; returns its metrics row."""
    run_dir = out / method
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh step, not an appended log
    cmd = [sys.executable, str(ROOT / "hintsd.py"), "--method", method, "--steps", "1", "--no-after-check",
           "--out", str(run_dir), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def ratio(x: float, ref: float) -> str:
    return f"{x / ref:.2f}x" if ref > 0 else "-"


def table(rows: dict[str, dict]) -> str:
    ref = rows.get("hintsd") or next(iter(rows.values()))
    step = lambda r: r["time_rollout"] + r["time_feedback"] + r["time_update"]  # noqa: E731
    out = ["| method | rollout s | feedback s | update s | step s | step / HINT-SD | peak GB | memory / HINT-SD "
           "| tokens supervised | tokens / HINT-SD | success |", "|" + "---|" * 11]
    for m, r in rows.items():
        out.append(f"| {m} | {r['time_rollout']:.1f} | {r['time_feedback']:.1f} | {r['time_update']:.1f} | "
                   f"{step(r):.1f} | {ratio(step(r), step(ref))} | {r['peak_mem_gb']:.2f} | "
                   f"{ratio(r['peak_mem_gb'], ref['peak_mem_gb'])} | {r['tokens_supervised']} | "
                   f"{ratio(r['tokens_supervised'], ref['tokens_supervised'])} | "
                   + (f"{r['rollouts'] - r['failed']}/{r['rollouts']} |" if r["failed"] is not None else "- |"))
    return "\n".join(out)


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--out", default="runs/efficiency", help="one run dir per method under it")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    out = Path(args.out)
    rows = {}
    for m in args.methods:
        try:
            rows[m] = run_method(m, out, extra)
        except subprocess.CalledProcessError as e:  # report the others; say which one failed
            print(f"[efficiency] {m} failed with exit code {e.returncode}; left out of the table", file=sys.stderr)
    if not rows:
        raise SystemExit("[efficiency] every method failed")
    text = table(rows)
    (out / "table.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
