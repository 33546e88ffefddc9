"""How long the analyzer takes with the authors' prompt (the tool schemas in view), code against code, dtype against
dtype, on the same failed rollouts, side by side in one run:

    python bench/analyzer_speed.py --old /tmp/pre25 [--limit 16] [--sides old:float32 new:float32 new:bfloat16]

--old: a checkout of older code (`git worktree add /tmp/pre25 09e57c2^`: before the prefix-tree prefill and bf16).
The chats are built once by this code (prompts.analyzer_messages on bench/analyzer_rollouts.jsonl, replayed), then
each side, in a process of its own (nothing else shares the CPU), answers them with its own `generate_texts` at the
paper's analyzer decoding (temperature 0.6, top-p 0.95, 512 tokens, the same seed). Answers are sampled, so sides
can write different lengths: the table gives the tokens each wrote beside the seconds; --temperature 0 (greedy)
gives the sides the same work, up to the dtype's rounding.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def side_arg(text: str) -> str:
    """A --sides value: CODE:DTYPE, CODE old or new, DTYPE float32 or bfloat16."""
    code, _, dtype = text.partition(":")
    if code not in ("old", "new") or dtype not in ("float32", "bfloat16"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected CODE:DTYPE, CODE old or new, DTYPE float32 or bfloat16")
    return text


def child(a):
    """One side: import hintsd from a.code, answer the chats in a.chats, print a JSON line."""
    sys.path.insert(0, a.code)
    import hintsd
    import torch
    model, tok = hintsd.load_model(a.model, "cpu", getattr(torch, a.dtype))
    chats = json.load(open(a.chats))
    t0 = time.perf_counter()
    answers = hintsd.generate_texts(model, tok, chats, 512, a.temperature, 0.95, 0)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "tokens": sum(len(tok.encode(x)) for x in answers)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=False, help="a checkout of the older code (for the old:* sides)")
    ap.add_argument("--sides", nargs="+", type=side_arg, default=["old:float32", "new:float32", "new:bfloat16"],
                    help="CODE:DTYPE, CODE old or new, DTYPE float32 or bfloat16")
    ap.add_argument("--limit", type=int, default=16, help="the first N failed rollouts of the bench file")
    ap.add_argument("--temperature", type=float, default=0.6,
                    help="the analyzer's (the paper's 0.6); 0: greedy, so the sides write (nearly) the same answers")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--chats", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    if a.limit < 1:  # (hintsd.positive_int is not imported here: a child imports the other checkout's hintsd)
        ap.error(f"--limit {a.limit}: expected a positive count of rollouts")
    if any(s.startswith("old:") for s in a.sides) and not a.old:
        ap.error("an old:* side needs --old DIR")
    sys.path.insert(0, str(ROOT))
    import analyzer as bench  # bench/analyzer.py: the rollouts file and its replay
    import envs
    import hintsd
    import prompts
    model, tok = hintsd.load_model(hintsd.DEFAULT_MODEL)
    tasks_by_id = {t["id"]: t for t in envs.load_tasks("bfcl", "train", 1)}
    lines = open(bench.ROLLOUTS).read().splitlines()[:a.limit]
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp, "rollouts.jsonl")
        subset.write_text("\n".join(lines) + "\n")
        trajs = bench.replayed(model, tok, tasks_by_id, subset)
        chats = [prompts.analyzer_messages(t, "bfcl", "multi", "authors") for t in trajs]
        prompt_tokens = sum(len(prompts.prompt_ids(tok, c, None)[0]) for c in chats)
        Path(tmp, "chats.json").write_text(json.dumps(chats))
        model_dir = hintsd.embedded_model(hintsd.CACHE_DIR)  # both sides load this converted dir
        del model
        print(f"{len(chats)} failed rollouts of {len({t.task_id for t in trajs})} tasks, {prompt_tokens} prompt "
              f"tokens in all", flush=True)
        rows = []
        for side in a.sides:
            code, dtype = side.split(":")
            cmd = [sys.executable, __file__, "--child", "--code", a.old if code == "old" else str(ROOT), "--dtype",
                   dtype, "--chats", str(Path(tmp, "chats.json")), "--model", model_dir, "--temperature",
                   str(a.temperature)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows.append((side, json.loads(out)))
            print(side, rows[-1][1], flush=True)
    base = rows[0][1]["seconds"]
    print(f"\n| side | seconds | tokens written | x {rows[0][0]} |\n|---|---|---|---|")
    for side, r in rows:
        print(f"| {side} | {r['seconds']:.0f} | {r['tokens']} | {base / r['seconds']:.2f}x |")


if __name__ == "__main__":
    main()
