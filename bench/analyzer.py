"""The hindsight analyzer, offline: how often its answers name the step and the fix the oracle would, per setting.

    python bench/analyzer.py --no-verify          # every setting on bench/analyzer_rollouts.jsonl (~50 min, 2 cores,
                                                  # before the +tool setting was added; not measured at 0.5B)
    python bench/analyzer.py                      # the same, each target also replay-verified (2-3 hours)
    python bench/analyzer.py --make               # sample that file again (the embedded model; about an hour)
    python bench/analyzer.py --tool-choice        # could the analyzer pick the right tool from the list? (~15 min)
    python bench/analyzer.py --follow             # would the teacher call the right tool if told it? (~5 min)
    python bench/analyzer.py --judge --verify-samples 4   # would the policy pick the right call among those that
                                                          # run? (~18 min in float32)
    python bench/analyzer.py --judge --verify-samples 16  # the same, and is the right call among 16 tries at all?
                                                          # (~1 hour in float32)
    python bench/analyzer.py --no-verify --analyzer-model DIR   # a larger analyzer (bench/larger_analyzer.py)
    python bench/analyzer.py --no-verify --settings authors+forced+tool --analyzer-model DIR   # its tool pick (~50 min)
    python bench/analyzer.py --settings env --verify-samples 4   # env's error text, replay-verified (~23 min)

The rollouts: failed first-turn rollouts (--turns 1) of the embedded 0.5B on 12 BFCL train tasks, sampled once with
the cpu preset's rollout settings (friendly protocol, 4 rollouts a task at temperature 0.6, 3 env steps, 64 new
tokens) and saved as action texts; each run replays them into trajectories (the environment's real answers and
token ids, no model call). The analyzer is the initial policy, which is what the EMA teacher is at step 0, or the
--analyzer-model given (the paper's "larger model" source).
Each answer is scored against the BFCL oracle (envs.oracle_feedback: the first step that leaves the ground truth,
and the right call there):
  no target     the answer names no step (a parse failure, or every target dropped by replay)
  first = oracle  its first target is the oracle's first wrong step (over rollouts where the oracle names one)
  right function  that target's feedback names the function of the oracle's right call (where it names one)
  executable    the teacher, given that feedback, writes an action at that step that parses, calls a known function
                and gets no error back when the environment is replayed to it and runs it (hintsd.verify_targets)
Settings (rows): compact = the cpu preset's analyzer (compact prompt, greedy, 128 tokens, lenient parser);
authors = the paper's (the authors' view with the tool schemas, temperature 0.6, top-p 0.95, 512 tokens, strict
parser); +forced = --analyzer-forced; +tool = --analyzer-tool-pick; env = no analyzer, the environment's answer of
the first failing steps (Table 3's env source); +verify = the same answers with --verify-targets applied (its scores
are over the targets replay kept; with --verify-samples N, a kept sampled action is quoted in its feedback).
--tool-choice asks whether a constraint on the feedback's function name could help: after the authors' view and
'{"failures": [{"step": <the oracle's step>, "feedback": "The agent should call the tool "', each tool of the
rollout's list is scored by its log-probability (name and closing quote), and the best one is compared with the
oracle's function; "calibrated" subtracts each name's score in the same view with the user's request blanked (a
content-free prior against the model's preference for some names whatever the request, Zhao et al. 2021);
"policy" scores the names in the policy's own context at that step, after '{"name": "' (what the policy would call
if its call were restricted to the real tools).
--follow asks the other half: at the oracle's step, does the teacher (the initial policy, greedy) call the oracle's
function with no feedback, with that tool's name as the feedback, with the oracle's own feedback (see follow()).
--judge asks whether the policy could pick, among the corrections that pass replay, the right one (replay tells a call
that runs from one that fails, not a right call from a wrong one): at the oracle's step, the oracle's right call
stands beside the teacher's tries (env's feedback in view, greedy and --verify-samples - 1 sampled) that pass replay
and call another function, and the policy, as the OpenClaw judge (prompts.judge_messages: the request, the call,
what the environment answered), scores each by log p(1) - log p(-1) after '{"score": ' (see judge()). It first
prints the coverage of the tries: per k, the rollouts where one of the first k tries calls the oracle's function (and
one also runs), the most that any pick among the policy's own tries could find (see coverage()).
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
import hintsd  # noqa: E402
import prompts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROLLOUTS = ROOT / "bench" / "analyzer_rollouts.jsonl"
TASKS = ["multi_turn_base_93", "multi_turn_base_146", "multi_turn_base_105", "multi_turn_base_115",
         "multi_turn_base_118", "multi_turn_base_127", "multi_turn_base_25", "multi_turn_base_9", "multi_turn_base_37",
         "multi_turn_base_66", "multi_turn_base_164", "multi_turn_base_158"]  # 4 API classes
SETTINGS = {  # name: (source, analyzer prompt, temperature, top-p, tokens, parser, forced, tool pick)
    "compact": ("policy", "compact", 0.0, 1.0, 128, "lenient", False, False),
    "authors": ("policy", "authors", 0.6, 0.95, 512, "strict", False, False),
    "authors+forced": ("policy", "authors", 0.6, 0.95, 512, "strict", True, False),
    "compact+forced": ("policy", "compact", 0.0, 1.0, 128, "lenient", True, False),
    "authors+forced+tool": ("policy", "authors", 0.6, 0.95, 512, "strict", True, True),
    "env": ("env", "compact", 0.0, 1.0, 0, "lenient", False, False),  # no analyzer: the environment's own answer
}
SAMPLING = hintsd.SamplingConfig(max_new_tokens=64, temperature=0.6, max_len=8192)


def make(a, model, tok):
    """Sample the rollouts (4 per task) and save the failed ones as action texts."""
    tasks = envs.load_tasks("bfcl", "train", 1, a.tasks)
    with open(a.rollouts, "w") as f:
        for task in tasks:
            envs_ = [envs.make_env(task, "json", 3, "friendly") for _ in range(4)]
            trajs = hintsd.rollout(model, tok, envs_, SAMPLING, [hintsd.seed_of(7, task["id"], r) for r in range(4)])
            for t in trajs:
                if t.reward < 1.0:
                    f.write(json.dumps({"task_id": t.task_id, "actions": [s.text for s in t.steps]}) + "\n")
            print(task["id"], [t.reward for t in trajs], flush=True)


def replayed(model, tok, tasks_by_id, path) -> list:
    """The saved rollouts as trajectories, replayed through the real environment (no model call)."""
    rows = [json.loads(x) for x in open(path)]
    envs_ = [envs.make_env(tasks_by_id[r["task_id"]], "json", 3, "friendly") for r in rows]
    trajs = hintsd.rollout(model, tok, envs_, SAMPLING, [0] * len(rows), forced=[r["actions"] for r in rows])
    assert all(t.reward < 1.0 for t in trajs)
    return trajs


def oracle_of(task, steps: list[tuple[int, str]]) -> tuple[int | None, str | None]:
    """(the oracle's first wrong step, 0-based, or None; the function of its right call, or None) for the rollout
    whose steps are [(turn, action text)]."""
    found = envs.oracle_feedback(task, steps, "json", "friendly")
    return (found[0][0] - 1, right_function(found[0][1])) if found else (None, None)


def right_function(text: str) -> str | None:
    """The function of the right call in an oracle feedback text: the one after "The right call is:", not the
    broken call the text may quote before it."""
    name = re.search(r'"name": "([^"]+)"', text.partition("The right call is:")[2])
    return name[1] if name else None


def oracle_rows(trajs, tasks_by_id) -> list[tuple[int, int, str, str]]:
    """(rollout index, the oracle's first wrong step, 0-based, the function of its right call, its feedback text)
    for each rollout whose oracle feedback names a function (the --follow and --judge probes' rows)."""
    rows = []
    for i, t in enumerate(trajs):
        found = envs.oracle_feedback(tasks_by_id[t.task_id], [(s.turn, s.text) for s in t.steps], "json", "friendly")
        fn = right_function(found[0][1]) if found else None
        if fn:
            rows.append((i, found[0][0] - 1, fn, found[0][1]))
    return rows


def tool_scores(model, tok, ids: list[int], names: list[str]) -> dict[str, float]:
    """Each name's log-probability (name and closing quote) as the continuation of ids (one packed forward)."""
    logp = hintsd.name_logprobs(model, [ids], [prompts.encode(tok, n + '"') for n in names])[0]
    return dict(zip(names, logp.tolist()))


def analyzer_view(tok, t, step: int) -> list[int]:
    """The authors' view of rollout t, then an answer that names 0-based step `step` and begins its feedback."""
    head = '{"failures": [{"step": %d, "feedback": "The agent should call the tool "' % (step + 1)
    return prompts.prompt_ids(tok, prompts.analyzer_messages(t, "bfcl", "multi", "authors"), None)[0] + \
        prompts.encode(tok, head)


def tool_choice(model, tok, trajs, oracle, external=None) -> None:
    """The --tool-choice probe: how often the best-scored tool name is the oracle's function, in the analyzer's view
    (raw, and calibrated by the view with the request blanked; external: (model, tok) of the analyzer when it is not
    the policy) and in the policy's own context at that step."""
    am, at = external or (model, tok)
    picks = {"analyzer": 0, "calibrated": 0, "policy": 0}
    n = own = fixed = 0  # own: the rollout called the oracle's function there; fixed: it did not, the policy's pick did
    for i, t in enumerate(tqdm(trajs, "tool choice")):
        step, fn = oracle[i]
        if step is None or fn is None:
            continue
        names = [x["function"]["name"] for x in t.tools]  # the chat template's schemas, as envs reads them
        blank = prompts.blank_requests(t)
        s, s0 = (tool_scores(am, at, analyzer_view(at, x, step), names) for x in (t, blank))
        act = tool_scores(model, tok, t.tokens[:t.steps[step].start] + prompts.encode(tok, '{"name": "'), names)
        best = {"analyzer": max(s, key=s.get), "calibrated": max(s, key=lambda k: s[k] - s0[k]),
                "policy": max(act, key=act.get)}
        called = fn in t.steps[step].text
        n, own, fixed = n + 1, own + called, fixed + (not called and best["policy"] == fn)
        picks = {k: v + (best[k] == fn) for k, v in picks.items()}
        print(f"  {t.task_id}: oracle {fn}; " + "; ".join(f"{k} {v}" for k, v in best.items()) +
              f"; the rollout called {'it' if called else 'another'}", flush=True)
    print(f"tool choice over {n} rollouts, the oracle's function picked: " +
          ", ".join(f"{k} {v} ({100 * v / n:.0f}%)" for k, v in picks.items()) +
          f"; {n - own} rollouts had called another function there, and the policy's pick was right in {fixed}")


def follow(model, tok, trajs, tasks_by_id) -> None:
    """The --follow probe: given feedback at the oracle's step that names the right tool, does the teacher (the
    initial policy with the feedback in view, greedy) call it? Per rollout, three teacher actions at that step:
    with no feedback (the student's own greedy action), with the right tool's name only (what a perfect tool pick
    would give: 'The agent should call the tool "<fn>".'), with the oracle's feedback (the right call, arguments
    and all). Each is scored: it calls the oracle's function; it passes replay (envs.correction_problem)."""
    rows, keys = oracle_rows(trajs, tasks_by_id), ("none", "name", "oracle")
    ctxs = []
    for i, step, fn, oracle_text in rows:
        t = trajs[i]
        ctxs += [t.tokens[:t.steps[step].start]] + [
            hintsd.teacher_view(tok, t, hintsd.Target(i, step, fb), t.steps[step].start)
            for fb in (f'The agent should call the tool "{fn}".', oracle_text)]
    acts = hintsd.teacher_actions(model, tok, ctxs, 0.0)
    calls = {k: 0 for k in keys}
    replays = {k: 0 for k in keys}
    for r, (i, step, fn, _) in enumerate(rows):
        t, three = trajs[i], acts[3 * r:3 * r + 3]
        task, earlier = tasks_by_id[t.task_id], [s.text for s in t.steps[:step]]
        for k, a in zip(keys, three):
            calls[k] += fn in called(a)
            replays[k] += envs.correction_problem(task, earlier, a, t.steps[step].text, "json", 3) is None
        print(f"  {t.task_id} step {step + 1}: oracle {fn}; " +
              "; ".join(f"{k}: {a[:90]!r}" for k, a in zip(keys, three)), flush=True)
    n = max(len(rows), 1)
    print(f"\n{len(rows)} rollouts where the oracle names a function\n")
    print("| feedback at the oracle's step | the teacher calls the right function | its action passes replay |")
    print("|---|---|---|")
    for k in keys:
        print(f"| {k} | {calls[k]} ({100 * calls[k] / n:.0f}%) | {replays[k]} ({100 * replays[k] / n:.0f}%) |")


def judge(model, tok, trajs, tasks_by_id, samples: int, seed: int) -> None:
    """The --judge probe: at the oracle's step of each rollout, the oracle's right call and the teacher's tries that
    pass replay but call another function (candidates that "merely run"), each executed after the rollout's earlier
    actions and scored by the policy as a judge; how often the right call scores highest, against chance (1 / the
    number of candidates). "calibrated": each score minus the same judge's score with the request blanked."""
    rows = [(i, step, fn, text.partition("The right call is:")[2].strip())
            for i, step, fn, text in oracle_rows(trajs, tasks_by_id)]
    ctxs = [hintsd.teacher_view(tok, trajs[i], hintsd.Target(i, step, prompts.env_answer(trajs[i].steps[step])),
                                trajs[i].steps[step].start) for i, step, _, _ in rows]
    tries = [[g] for g in hintsd.teacher_actions(model, tok, ctxs, 0.0)]
    if samples > 1:
        sampled = hintsd.teacher_actions(model, tok, [c for c in ctxs for _ in range(samples - 1)], 1.0, seed=seed)
        tries = [g + sampled[r * (samples - 1):(r + 1) * (samples - 1)] for r, g in enumerate(tries)]
    coverage(rows, tries, trajs, tasks_by_id)
    one, minus = prompts.encode(tok, "1"), prompts.encode(tok, "-1")
    n = raw = cal = 0
    chance = 0.0
    for (i, step, fn, right), acts in zip(tqdm(rows, "judge"), tries):
        t, task = trajs[i], tasks_by_id[trajs[i].task_id]
        earlier = [s.text for s in t.steps[:step]]
        wrong = []
        for a in dict.fromkeys(acts):  # the distinct tries that run and call another function
            names = called(a)
            if names and fn not in names and not envs.correction_problem(task, earlier, a, "", "json", 3):
                wrong.append(a)
        if not wrong or envs.correction_problem(task, earlier, right, "", "json", 3):
            continue  # nothing to choose between (or the right call itself does not run here)
        cands = [right] + wrong
        request = prompts.step_requests(t)[step]
        views = [prompts.prompt_ids(tok, prompts.judge_messages(req, a, answer(task, earlier, a)), None)[0] +
                 prompts.encode(tok, '{"score": ') for req in (request, "") for a in cands]
        lp = hintsd.name_logprobs(model, views, [one, minus])
        margin = (lp[:, 0] - lp[:, 1]).view(2, len(cands))
        n, chance = n + 1, chance + 1 / len(cands)
        raw += int(margin[0].argmax()) == 0
        cal += int((margin[0] - margin[1]).argmax()) == 0
        print(f"  {t.task_id} step {step + 1}: " + "; ".join(
            f"{','.join(called(a))} {m:+.2f}/{m - m0:+.2f}" for a, m, m0 in zip(cands, *margin.tolist())), flush=True)
    n1 = max(n, 1)
    print(f"\n{len(rows)} rollouts where the oracle names a function; {n} with a try that runs and calls another one")
    print(f"the right call scored highest: raw {raw} ({100 * raw / n1:.0f}%), calibrated {cal} ({100 * cal / n1:.0f}%);"
          f" chance {100 * chance / n1:.0f}%")


def coverage(rows, tries: list[list[str]], trajs, tasks_by_id) -> None:
    """Is the right call among the policy's own tries at all? Per k (1, 2, 4, ... up to the tries a rollout: the
    greedy one, then the sampled ones in order), the rollouts where one of the first k tries calls the oracle's
    function, and where one also passes replay (parses, runs, no error): the most that any pick among the tries
    (replay, a judge) could find, whatever does the picking. rows: oracle_rows' (rollout, step, function, ...)."""
    first = []  # per row: the index of the first try that calls the function, of the first that also runs
    for (i, step, fn, *_), acts in zip(rows, tries):
        task, earlier = tasks_by_id[trajs[i].task_id], [s.text for s in trajs[i].steps[:step]]
        calls = [fn in called(a) for a in acts]
        runs = [c and envs.correction_problem(task, earlier, a, "", "json", 3) is None for c, a in zip(calls, acts)]
        first.append((calls.index(True) if any(calls) else None, runs.index(True) if any(runs) else None))
    n = len(tries[0]) if tries else 0
    ks = sorted({min(2 ** e, n) for e in range(n.bit_length() + 1)} - {0})
    print(f"\nthe right function among the first k tries, of {len(rows)} rollouts (calls it / also runs): " + "; ".join(
        f"k={k}: {sum(c is not None and c < k for c, _ in first)} / {sum(r is not None and r < k for _, r in first)}"
        for k in ks))
    by_task = {}
    for (i, *_), (c, r) in zip(rows, first):
        by_task.setdefault(trajs[i].task_id, []).append((c is not None, r is not None))
    print(f"per task, all {n} tries: " + "; ".join(f"{task.removeprefix('multi_turn_')} {sum(c for c, _ in v)}/"
                                                   f"{sum(r for _, r in v)} of {len(v)}" for task, v in by_task.items()))


def answer(task, earlier: list[str], action: str) -> str:
    """What the environment answers action after the rollout's earlier actions (replayed; no model call)."""
    env = envs.make_env(task, "json", 3, "friendly")
    env.reset()
    for a in earlier:
        env.step(a)
    return "\n".join(str(m.get("content", "")) for m in env.step(action))


def called(action: str) -> list[str]:
    """The functions an action calls, in order (none if it does not parse)."""
    return [c for c, _ in envs.parse_calls(action, "json", "friendly")[0]]


def after_replay(per: list[list], kept: list) -> list[list]:
    """per[i]: rollout i's targets; kept: those verify_targets kept, where a target rescued by a sampled try is a new
    Target (its feedback quotes the try) -> rollout i's kept targets, in per's order, as kept (quote and all)."""
    by_place = {(tg.traj, tg.step): tg for tg in kept}
    return [[by_place[tg.traj, tg.step] for tg in p if (tg.traj, tg.step) in by_place] for p in per]


def score(trajs, answers_targets: list[list], oracle: list, executable: list[bool] | None) -> dict:
    """The four shares (percent) over the rollouts; answers_targets[i]: the targets (Target) of rollout i."""
    n = len(trajs)
    none = sum(not tg for tg in answers_targets)
    with_step = [i for i, (step, _) in enumerate(oracle) if step is not None and answers_targets[i]]
    first = sum(answers_targets[i][0].step == oracle[i][0] for i in with_step)
    named = [i for i, (_, fn) in enumerate(oracle) if fn and answers_targets[i]]
    right = sum(oracle[i][1] in answers_targets[i][0].feedback for i in named)
    out = {"no target": 100 * none / n, "first = oracle": 100 * first / max(len(with_step), 1),
           "right function": 100 * right / max(len(named), 1)}
    if executable is not None:
        out["executable"] = 100 * sum(executable) / max(len(executable), 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make", action="store_true", help="sample the rollouts file again")
    ap.add_argument("--rollouts", default=str(ROLLOUTS))
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--model", default=hintsd.DEFAULT_MODEL)
    ap.add_argument("--analyzer-model", help="a larger analyzer (a local model dir or HF id; the paper's 'larger model' "
                                             "source) in place of the initial policy; the rollouts stay the policy's")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tool-choice", action="store_true",
                    help="only the tool-choice probe: the best-scored name of the tool list against the oracle's")
    ap.add_argument("--follow", action="store_true",
                    help="only the follow probe: does the teacher call the right tool when the feedback names it?")
    ap.add_argument("--judge", action="store_true",
                    help="only the judge probe: does the policy, as a judge, score the right call above tries "
                         "that run but call another function? (--verify-samples N: N tries a rollout)")
    ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="also replay-verify every target (the executable column and the +verify rows; slow)")
    ap.add_argument("--verify-samples", type=int, default=1,
                    help="with --verify: a target whose greedy correction fails gets N - 1 sampled tries "
                         "(hintsd's --verify-samples); with --judge: the tries a rollout, greedy and N - 1 sampled")
    a = ap.parse_args()
    dtype = None if a.dtype == "auto" else getattr(torch, a.dtype)
    model, tok = hintsd.load_model(a.model, "cpu", dtype)
    if a.make:
        return make(a, model, tok)
    external = hintsd.load_model(a.analyzer_model, "cpu", dtype) if a.analyzer_model else None
    tasks_by_id = {t["id"]: t for t in envs.load_tasks("bfcl", "train", 1)}
    trajs = replayed(model, tok, tasks_by_id, a.rollouts)
    oracle = [oracle_of(tasks_by_id[t.task_id], [(s.turn, s.text) for s in t.steps]) for t in trajs]
    print(f"{len(trajs)} failed rollouts of {len({t.task_id for t in trajs})} tasks; the oracle names a step in "
          f"{sum(s is not None for s, _ in oracle)} and a function in {sum(f is not None for _, f in oracle)}; "
          f"dtype {next(model.parameters()).dtype}", flush=True)
    if a.tool_choice:
        return tool_choice(model, tok, trajs, oracle, external)
    if a.follow:
        return follow(model, tok, trajs, tasks_by_id)
    if a.judge:
        return judge(model, tok, trajs, tasks_by_id, a.verify_samples, a.seed)
    rows = []
    for name in a.settings:
        source, style, temp, top_p, tokens, parser, forced, tool_pick = SETTINGS[name]
        cfg = hintsd.AnalyzerConfig(source, style, parser, tokens, temp, top_p, forced=forced, tool_pick=tool_pick)
        t0 = time.perf_counter()
        h = hintsd.select_targets(model, tok, trajs, cfg, "multi", "bfcl", {}, tasks_by_id, "json", "friendly",
                                  a.seed, external)
        seconds = time.perf_counter() - t0
        per = [[tg for tg in h.targets if tg.traj == i] for i in range(len(trajs))]
        executable, line = None, ""
        if a.verify:  # replay verification of every target: "executable" is that of the first ones
            t0 = time.perf_counter()
            kept, dropped = hintsd.verify_targets(model, tok, trajs, h.targets, None, tasks_by_id, 64, "json",
                                                  "friendly", 3, a.verify_samples, a.seed)
            verify_s = time.perf_counter() - t0
            per_kept = after_replay(per, kept)
            executable = [bool(pk) and pk[0].step == p[0].step for p, pk in zip(per, per_kept) if p]
            after = score(trajs, per_kept, oracle, None)
            line = f"; verification {verify_s:.0f} s kept {len(kept)}, dropped {dropped}; after it: {fmt(after)}"
            for tg in kept:  # what replay kept: the oracle's function, and the feedback's end (a sampled try's quote)
                print(f"  kept {trajs[tg.traj].task_id} step {tg.step + 1} (oracle: {oracle[tg.traj][1]}): "
                      f"{tg.feedback[-160:]!r}")
        first_scores = score(trajs, per, oracle, executable)
        rows.append((name, first_scores, seconds, len(h.targets)))
        if a.verify:
            rows.append((name + "+verify", after, seconds + verify_s, len(kept)))
        print(f"{name}: {seconds:.0f} s, {len(h.targets)} targets; {fmt(first_scores)}{line}", flush=True)
        for i, (ans, p) in enumerate(zip(h.answers, per)):
            if i < 3:
                print(f"  answer {i}: {ans[:300]!r} -> {[(tg.step + 1, tg.feedback[:80]) for tg in p]}")
    print("\n| setting | no target | first = oracle | right function | executable | targets | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, s, seconds, n in rows:
        ex = f"{s['executable']:.0f}%" if "executable" in s else ("100%" if name.endswith("+verify") else "-")
        print(f"| {name} | {s['no target']:.0f}% | {s['first = oracle']:.0f}% | {s['right function']:.0f}% | "
              f"{ex} | {n} | {seconds:.0f} |")


def fmt(s: dict) -> str:
    return ", ".join(f"{k} {v:.0f}%" for k, v in s.items())


if __name__ == "__main__":
    main()
