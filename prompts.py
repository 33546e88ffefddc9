"""
Hindsight-analyzer prompt, the per-step judge prompt, and forgiving parsers for their answers.

HINT-SD asks the policy itself to read a whole failed rollout and name up to k
failure-relevant steps, each with a short correction. Steps are numbered by the
assistant messages of the rollout: step n is the n-th assistant message (1-based).
The chosen steps become distillation targets, and each correction is inserted as
one user message (feedback_message) right before that step in the teacher context.

The OpenClaw-RL-style baseline instead asks a judge about every single step
(judge_messages: the request, the action and what came back); parse_judgement
reads its +-1 score and optional hint.

Small models rarely return clean JSON, so parse_analysis accepts code fences,
prose around the JSON, a bare object or list, steps written as "3" or "Step 3",
a few alternative key names and trailing commas. It never raises.
"""

import json
import re

MAX_TRAJ_CHARS = 12_000     # the authors keep only the last 12k characters of the trajectory
MAX_TASK_CHARS = 3_000      # the task is kept from its start, up to this (and max_chars // 4)
MAX_FEEDBACK_CHARS = 500    # longer feedback is cut to this length
MAX_PARSE_CHARS = 50_000    # the parser only looks at the start of the analyzer's answer
MAX_SCAN_STARTS = 200       # at most this many '{' / '[' positions are tried as JSON starts
SUCCESS_REWARD = 1.0        # a reward at or above this counts as a success in the outcome line
CLIP_MARKER = "[... earlier steps clipped ...]"
STEP_KEYS = ("step", "turn", "step_id", "step_index", "step_number")
FEEDBACK_KEYS = ("feedback", "hint", "correction", "fix")

# -----------------------------------------------------------------------------
# trajectory -> text

def _content(msg: dict) -> str:
    """The text of one chat message; structured tool calls (if any) are appended as JSON."""
    text = msg.get("content") or ""
    if not isinstance(text, str):
        text = json.dumps(text, ensure_ascii=False, default=str)
    if msg.get("tool_calls"):
        text += "\n" + json.dumps(msg["tool_calls"], ensure_ascii=False, default=str)
    return text.strip()

def _blocks(messages: list[dict]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split a chat into the task (user messages before step 1) and (label, text) blocks."""
    task, blocks, step = [], [], 0
    for msg in messages:
        role = msg.get("role")
        if role == "assistant":
            step += 1
            blocks.append((f"Step {step} (assistant): ", _content(msg)))
        elif role == "user" and step == 0:
            task.append(_content(msg))
        elif role == "user":
            blocks.append(("User: ", _content(msg)))
        elif role == "tool" and step > 0:
            blocks.append(("Output: ", _content(msg)))
    return task, blocks                 # system messages (tool docs) are left out on purpose

def _clip_blocks(blocks: list[tuple[str, str]], budget: int) -> list[str]:
    """Keep whole blocks from the end; the first block that does not fit keeps its label and the
    end of its text, so a step header is never cut."""
    kept = []
    for label, text in reversed(blocks):
        line = label + text
        if len(line) + 1 <= budget:
            kept.append(line)
            budget -= len(line) + 1
            continue
        room = budget - len(label) - len("...") - 1
        if room >= 20:                  # not worth keeping a few characters of a block
            kept.append(label + "..." + text[len(text) - room:])
        break
    return kept[::-1]

def render_trajectory(messages: list[dict], reward: float, max_chars: int = MAX_TRAJ_CHARS) -> str:
    """Readable text of one rollout: task, numbered steps with their outputs, final outcome.
    Clipped from the front (the end, where the failure shows, is kept) to at most max_chars."""
    task, blocks = _blocks(messages)
    task_text = "\n".join(task)
    task_cap = min(MAX_TASK_CHARS, max_chars // 4)
    if len(task_text) > task_cap:
        task_text = task_text[:task_cap] + " ..."
    head = "Task:\n" + task_text
    verdict = "SUCCESS" if reward >= SUCCESS_REWARD else "FAILED"
    outcome = f"Outcome: {verdict} (reward {round(float(reward), 3)})"
    body = [label + text for label, text in blocks]
    full = "\n".join([head, *body, outcome])
    if len(full) <= max_chars:
        return full
    budget = max_chars - len(head) - len(CLIP_MARKER) - len(outcome) - 3   # 3 joining newlines
    return "\n".join([head, CLIP_MARKER, *_clip_blocks(blocks, budget), outcome])

def count_steps(messages: list[dict]) -> int:
    """Number of agent steps (assistant messages) in a chat; valid step ids are 1..count_steps."""
    return sum(1 for m in messages if m.get("role") == "assistant")

# -----------------------------------------------------------------------------
# the analyzer prompt

SYSTEM_PROMPT = ("You review runs of an AI agent that uses tools. You find the steps where the "
                 "agent went wrong and say what it should have done instead.")

INSTRUCTIONS = """Read the whole run above. It failed. Find at most {k} {steps} where the agent made a mistake that caused the failure.
Rules:
- Prefer the step where the mistake started (the root cause) over later steps that only suffer from it.
- Use the step numbers shown in the run (1 to {n}).
- For each step, write one or two sentences to the agent that say what it should have done at that step. Start with "You should".
- Answer with JSON only, earliest step first, in this form:
{{"failures": [{{"step": <step number>, "feedback": "You should <the right action for that step>."}}]}}
Replace the <...> parts with your own analysis of this run."""

def analyzer_messages(messages: list[dict], reward: float, k: int = 3,
                      tool_names: list[str] | None = None) -> list[dict]:
    """Chat that asks the policy, as hindsight analyzer, for up to k failure-relevant steps
    (k=3 for HINT-SD-Multi, k=1 for Single). Meant for failed rollouts only."""
    parts = []
    if tool_names:
        parts.append("Functions the agent could call: " + ", ".join(tool_names) + ".")
    parts.append("Here is the run:\n\n" + render_trajectory(messages, reward) + "\n")
    parts.append(INSTRUCTIONS.format(k=k, steps="step" if k == 1 else "steps",
                                     n=count_steps(messages)))
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "\n".join(parts)}]

def feedback_message(feedback: str) -> dict:
    """The user message inserted right before the target action in the teacher context."""
    return {"role": "user", "content": f"Hint for your next action: {feedback.strip()}"}

# -----------------------------------------------------------------------------
# parsing the analyzer's answer

def _chunks(text: str) -> list[str]:
    """Places to look for JSON: the contents of ``` fences first, then the whole text."""
    pieces = text.split("```")
    fenced = [re.sub(r"^\s*json\b", "", p, flags=re.I) for p in pieces[1::2]]
    return [*fenced, text]

def _repair(text: str) -> str:
    """Small textual fixes: trailing commas, Python literals, single quotes (only if no double)."""
    text = re.sub(r",\s*([}\]])", r"\1", text)
    literals = {"True": "true", "False": "false", "None": "null"}
    text = re.sub(r"([:\[,]\s*)(True|False|None)\b", lambda m: m.group(1) + literals[m.group(2)], text)
    return text.replace("'", '"') if '"' not in text else text

def _json_values(text: str) -> list:
    """All JSON values found in text: the text itself, or else every top-level '{' / '[' span."""
    try:
        return [json.loads(text)]
    except (ValueError, RecursionError):
        pass
    decoder, values, pos = json.JSONDecoder(), [], 0
    for _ in range(MAX_SCAN_STARTS):
        starts = [i for i in (text.find("{", pos), text.find("[", pos)) if i >= 0]
        if not starts:
            break
        start = min(starts)
        try:
            value, pos = decoder.raw_decode(text, start)
            values.append(value)
        except (ValueError, RecursionError):
            pos = start + 1
    return values

def _entries(value, depth: int = 0) -> list[dict]:
    """Dicts that look like one failure entry, found anywhere in a (shallow) JSON value."""
    if depth > 4:
        return []
    if isinstance(value, dict):
        keys = {str(key).strip().lower() for key in value}
        if keys & set(STEP_KEYS):
            return [value]
        value = list(value.values())    # a wrapper such as {"failures": [...]}
    if isinstance(value, list):
        return [e for item in value[:100] for e in _entries(item, depth + 1)]
    return []

def _lookup(entry: dict, names: tuple[str, ...]):
    lowered = {str(key).strip().lower(): val for key, val in entry.items()}
    return next((lowered[name] for name in names if name in lowered), None)

def _as_step(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(?:step|turn)?[\s#:_-]*(\d{1,6})\s*\.?\s*", value, flags=re.I)
        return int(m.group(1)) if m else None
    return None

def _clean(entries: list[dict], n_steps: int, k: int) -> list[tuple[int, str]]:
    """Valid (step, feedback) pairs: step in 1..n_steps, non-empty feedback, first per step,
    sorted by step, at most k."""
    found = {}
    for entry in entries:
        step, feedback = _as_step(_lookup(entry, STEP_KEYS)), _lookup(entry, FEEDBACK_KEYS)
        if step is None or not 1 <= step <= n_steps or step in found:
            continue
        if isinstance(feedback, str) and feedback.strip():
            found[step] = feedback.strip()[:MAX_FEEDBACK_CHARS].rstrip()
    return sorted(found.items())[:max(k, 0)]

def parse_analysis(text: str, n_steps: int, k: int = 3) -> list[tuple[int, str]]:
    """[(step, feedback), ...] from the analyzer's raw answer; [] for anything unusable."""
    try:
        if not isinstance(text, str) or not text.strip():
            return []
        text = text[:MAX_PARSE_CHARS]
        for chunk in _chunks(text):
            for attempt in (chunk, _repair(chunk)):
                entries = [e for v in _json_values(attempt.strip()) for e in _entries(v)]
                found = _clean(entries, n_steps, k)
                if found:
                    return found
        return []
    except Exception:                   # a parser bug must never stop training
        return []

# -----------------------------------------------------------------------------
# the per-step judge (the OpenClaw-RL-style baseline)

JUDGE_SYSTEM = ("You check one step of an AI agent that uses tools. You see the user's request, the agent's "
                "action and what came back. You say whether the action was a correct step toward the request.")

JUDGE_INSTRUCTIONS = """User request:
{request}

Agent action:
{action}

What came back:
{outcome}

Was this action a correct and useful step toward the request? Answer with one JSON object and nothing else:
- "score": 1 if the action was correct and useful, -1 if it was not;
- "hint": "" when the score is 1; otherwise one sentence to the agent, starting with "You should", that says what it should have done instead at this step."""
# The format is described, not shown: a 0.5B judge copied a shown example's placeholder into every answer.
MAX_JUDGE_FIELD_CHARS = 1_500   # request, action and outcome are each cut to this (their ends are kept)


def _tail(text: str, n: int = MAX_JUDGE_FIELD_CHARS) -> str:
    text = (text or "").strip() or "(nothing)"
    return text if len(text) <= n else "..." + text[len(text) - n:]


def judge_messages(request: str, action: str, outcome: str) -> list[dict]:
    """Chat that asks the policy to judge one step from its next state: a +-1 score and maybe a hint."""
    user = JUDGE_INSTRUCTIONS.format(request=_tail(request), action=_tail(action), outcome=_tail(outcome))
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def _as_score(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and value in (1, -1):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?1\s*", value):
        return int(value)
    return None


def parse_judgement(text: str) -> tuple[int, str] | None:
    """(score, hint) from the judge's raw answer: score is +1 or -1, hint is "" when none was given. None for
    anything unusable. Never raises."""
    try:
        if not isinstance(text, str) or not text.strip():
            return None
        for chunk in _chunks(text[:MAX_PARSE_CHARS]):
            for attempt in (chunk, _repair(chunk)):
                for v in _json_values(attempt.strip()):
                    if not isinstance(v, dict):
                        continue
                    score = _as_score(_lookup(v, ("score", "reward", "rating")))
                    if score is None:
                        continue
                    hint = _lookup(v, ("hint",) + FEEDBACK_KEYS)
                    hint = hint.strip()[:MAX_FEEDBACK_CHARS].rstrip() if isinstance(hint, str) else ""
                    return score, hint
        return None
    except Exception:                   # a parser bug must never stop training
        return None
