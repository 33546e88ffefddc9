"""How often the authors' reward gating changes a rollout's label: the embedded model on BFCL train tasks cut to their
first user turn, under --action-protocol authors and the cpu preset's other settings (96 new tokens, temperature
0.6, 4 env steps, 8,192 tokens, seed 42). Each rollout is played once and scored twice: by the rule before
(the checker on the recorded calls once the last user turn was reached) and by the rule now (env.reward(): a
completed conversation whose every user turn made a call, else 0).

    python bench/gating.py [--tasks 8] [--k 4] [--model embedded]

The first --tasks train tasks (the paper split), --k rollouts each, seeded as step 0 of a training run. Prints a line
per task (status, old and new reward of each rollout) and the share of rollouts whose label changed.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import envs  # noqa: E402
import hintsd  # noqa: E402


def old_rule(env) -> float:
    """The reward before the gating: BFCLEnv.reward's friendly branch (the checker once the last user turn was
    reached), on the calls without the empty steps the authors' protocol now records to count a turn."""
    calls, protocol = env.calls, env.protocol
    env.calls, env.protocol = [[step for step in turn if step] for turn in calls], "friendly"
    try:
        return env.reward()
    finally:
        env.calls, env.protocol = calls, protocol


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=hintsd.positive_int, default=8)
    ap.add_argument("--k", type=hintsd.positive_int, default=4)
    ap.add_argument("--model", default=hintsd.DEFAULT_MODEL)
    a = ap.parse_args()
    p = hintsd.PRESETS["cpu"]
    model, tok = hintsd.load_model(a.model)
    cfg = hintsd.SamplingConfig(p["max_new_tokens"], p["temperature"], 1.0, p["max_len"])
    changed = total = 0
    for j, task in enumerate(envs.load_tasks("bfcl", "train", turns=1)[:a.tasks]):
        played = [envs.make_env(task, "json", p["max_env_steps"], "authors") for _ in range(a.k)]
        trajs = hintsd.rollout(model, tok, played, cfg, [hintsd.seed_of(p["seed"], 0, j, r) for r in range(a.k)])
        rows = [(t.status, old_rule(env), t.reward) for t, env in zip(trajs, played)]
        changed += sum(old != new for _, old, new in rows)
        total += len(rows)
        print(task["id"], " ".join(f"{s}:{old:g}->{new:g}" for s, old, new in rows), flush=True)
    print(f"label changed: {changed}/{total} rollouts ({100 * changed / total:.1f}%)")


if __name__ == "__main__":
    main()
