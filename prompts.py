"""
What the model reads and what is asked of it: chats as exact token ids, the teacher's feedback message, the
hindsight analyzer's prompts and parsers (and an endpoint client for a hosted analyzer), and the per-step judge.

HINT-SD asks an analyzer (the policy's EMA copy, or a larger model) to read a whole failed rollout and name
the failure-relevant steps, each with a short correction. The chosen steps become distillation targets, and
each correction is inserted as one user message (feedback_message) right before its step in the teacher's
context. Steps are 0-based inside Python and 1-based in every prompt and answer ("Step 1" is steps[0]).

Two prompt styles (--analyzer-prompt):
  authors  what the paper's code shows the analyzer: the task id, outcome, the system prompt with the full
           tool schemas and the first user query, then the step log clipped to its last 12,000 characters;
           the Multi prompt (up to 3 steps) or the Single prompt (the first failing step).
  compact  a shorter view for small models on CPU: no tool schemas, the task, numbered steps with their
           outputs, clipped by whole blocks; one prompt for Single and Multi (k = 1 or 3).
Two parsers (--analyzer-parser):
  strict   the authors': the first '{' to the last '}' through json.loads; anything else is a failure.
  lenient  code fences, prose around the JSON, bare objects or lists, "Step 3" as a step, a few alternative
           keys, trailing commas; feedback cut to 500 characters. Never raises.

The OpenClaw-RL-style baseline instead asks a judge about every single step (judge_messages: the request,
the action and what came back); parse_judgement reads its +-1 score and optional hint.
"""

import dataclasses
import http.client
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

MAX_TRAJ_CHARS = 12_000     # the authors keep only the last 12k characters of the step log
MAX_TASK_CHARS = 3_000      # compact view: the task is kept from its start, up to this (and max_chars // 4)
MAX_FEEDBACK_CHARS = 500    # lenient parser: longer feedback is cut to this length
MAX_PARSE_CHARS = 50_000    # the parsers only look at the start of an answer
MAX_SCAN_STARTS = 200       # lenient parser: at most this many '{' / '[' positions are tried as JSON starts
SUCCESS_REWARD = 1.0        # a reward at or above this counts as a success
CLIP_MARKER = "[... earlier steps clipped ...]"
AUTHORS_CLIP_MARKER = "[earlier trajectory omitted]"
PYTHON_FENCE = re.compile(r"```python\s*", re.I)  # an AppWorld code block's opening, as the authors match it
STEP_KEYS = ("step", "failure_step", "turn", "step_id", "step_index", "step_number")
FEEDBACK_KEYS = ("feedback", "hint", "correction", "fix")
FEEDBACK_PREFIX = "Consider the following feedback to solve this step:\n\n"  # the authors' wording
BENCH_NAMES = {"bfcl": "BFCL", "appworld": "AppWorld"}
CHARS_PER_TOKEN = 16        # a generous bound on characters per token (text and code average about 4)
MAX_REPLY_BYTES = 1 << 20   # endpoint: a reply body may hold this much besides the answer (12 bytes per answer char)

# ----------------------------------------------------------------------------- the teacher's feedback message

def feedback_message(feedback: str) -> dict:
    """The user message inserted right before the target action in the teacher's context."""
    return {"role": "user", "content": FEEDBACK_PREFIX + feedback.strip()}

# ----------------------------------------------------------------------------- chats as exact token ids
# A rollout keeps the exact ids the policy saw. The chat template renders the text around each message; the
# message contents are encoded as plain text, so a "<|im_end|>" written by a model or a tool stays text.

def valid_text(text) -> str:
    """Text a tokenizer accepts: lone surrogates (a JSON "\\ud800" escape, say) become '?'."""
    return str(text).encode("utf-8", "replace").decode("utf-8")


SENTINEL = "\ue000{}\ue001"  # private-use characters: stand-ins for message contents while the template renders


def render(tok, messages: list[dict], tools, gen_prompt: bool) -> tuple[str, list[str]]:
    """The chat template's text with each message content replaced by a sentinel, and the contents."""
    contents = [valid_text(m.get("content") or "").replace("\ue000", "").replace("\ue001", "") for m in messages]
    marked = [{**m, "content": SENTINEL.format(i)} for i, m in enumerate(messages)]
    text = tok.apply_chat_template(marked, tools=tools or None, tokenize=False, add_generation_prompt=gen_prompt)
    return text, contents


def encode_rendered(tok, text: str, contents: list[str]) -> list[int]:
    """Token ids of rendered chat text: the template's own text with its special tokens, each message content as
    plain text, so a "<|im_end|>" written by a model or an environment stays text and can never end a turn."""
    ids = []
    for i, piece in enumerate(re.split("\ue000(\\d+)\ue001", text)):
        if i % 2:
            ids += tok(contents[int(piece)], add_special_tokens=False, split_special_tokens=True).input_ids
        elif piece:
            ids += tok(piece, add_special_tokens=False).input_ids
    return ids


def encode(tok, text: str) -> list[int]:
    """Token ids of plain text (special-token strings stay text)."""
    return tok(valid_text(text), add_special_tokens=False, split_special_tokens=True).input_ids


def prompt_ids(tok, messages: list[dict], tools) -> tuple[list[int], int]:
    """Token ids of the whole chat plus the assistant header, and the header's length in tokens."""
    (full, contents), (base, _) = render(tok, messages, tools, True), render(tok, messages, tools, False)
    return encode_rendered(tok, full, contents), len(encode_rendered(tok, full[len(base):], contents))


def continuation_ids(tok, messages: list[dict], new: list[dict], tools, end_text: str) -> tuple[list[int], int]:
    """Token ids that follow an assistant action's end-of-turn token: the environment's new messages and the next
    assistant header. messages[-1] is that action. Append-only: the ids are cut from the render of the longer chat
    after the end-of-turn that closes the action, and nothing before it is read again. So a template that renders
    earlier messages differently once more follow (Qwen3 drops the empty <think> block of an answered assistant
    message) still extends the rollout; its earlier ids stay what the policy saw. Also returns the header's length
    in tokens."""
    base, _ = render(tok, messages + new, tools, False)
    full, contents = render(tok, messages + new, tools, True)
    action = SENTINEL.format(len(messages) - 1)
    if not full.startswith(base) or action not in full or end_text not in full[full.index(action):]:
        raise ValueError("the chat template drops the assistant's message or does not close it with "
                         f"{end_text!r}; cannot extend the rollout's token ids")
    cut = full.index(end_text, full.index(action)) + len(end_text)
    return encode_rendered(tok, full[cut:], contents), len(encode_rendered(tok, full[len(base):], contents))


def feedback_ids(tok, text: str) -> list[int]:
    """Token ids of the one user message that carries feedback, as the chat template renders it."""
    ctx = [{"role": "system", "content": "-"}, {"role": "user", "content": "-"}]
    (a, _), (b, contents) = render(tok, ctx, None, False), render(tok, ctx + [feedback_message(text)], None, False)
    assert b.startswith(a)
    return encode_rendered(tok, b[len(a):], contents)


# ----------------------------------------------------------------------------- authors view: a rollout as text

def _text(msg: dict) -> str:
    """The text of one chat message; structured tool calls (if any) are appended as JSON."""
    text = msg.get("content") or ""
    if not isinstance(text, str):
        text = json.dumps(text, ensure_ascii=False, default=str)
    if msg.get("tool_calls"):
        text += "\n" + json.dumps(msg["tool_calls"], ensure_ascii=False, default=str)
    return text.strip()


def format_messages(messages: list[dict]) -> str:
    """ROLE:\\ncontent blocks, empty messages skipped (the authors' format_messages_for_detection)."""
    return "\n\n".join(f"{str(m.get('role', 'unknown')).upper()}:\n{_text(m)}" for m in messages if _text(m))


def clip_tail(text: str, max_chars: int) -> str:
    """The last max_chars characters behind a marker (the end, where the failure shows, is kept)."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    return AUTHORS_CLIP_MARKER + "\n" + text[-max_chars:]


def initial_messages(messages: list[dict]) -> list[dict]:
    """The system prompt and the first user query: what the policy saw before its first action."""
    first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
    return messages[:first]


def with_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The messages with the tool schemas the chat template was given (the friendly protocol) listed at the end of
    the system message, compact JSON one per line as in the authors' system prompt: what the policy saw. Under the
    authors' protocol tools is [] (their system prompt holds the list) and the messages are returned as they are."""
    if not tools:
        return messages
    listing = "\n".join(json.dumps(x, ensure_ascii=False, separators=(",", ":")) for x in tools)
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{_text(messages[0])}\n\nTools:\n{listing}"}, *messages[1:]]
    return [{"role": "system", "content": f"Tools:\n{listing}"}, *messages]


def stringified(messages: list[dict]) -> list[dict]:
    """Messages as the authors store a step's environment output (_stringify_message): a role other than system,
    user or assistant becomes user, the content its str()."""
    roles = ("system", "user", "assistant")
    return [{"role": m.get("role") if m.get("role") in roles else "user", "content": str(m.get("content", ""))}
            for m in messages]


def appworld_action(text: str) -> str:
    """An AppWorld action as the authors store it (build_appworld_action): the last ```python block (any case) of
    the reply, stripped and fenced again as ```python; else the inner lines of a reply that is one fence; else the
    reply stripped. Found with str.find, linear in the text (their lazy regex is not)."""
    stripped, code, pos = text.strip(), None, 0
    while m := PYTHON_FENCE.search(stripped, pos):
        end = stripped.find("```", m.end())
        if end < 0:
            break
        code, pos = stripped[m.end():end].strip(), end + 3
    lines = stripped.splitlines()
    if code is None and stripped.startswith("```") and stripped.endswith("```") and len(lines) >= 3:
        code = "\n".join(lines[1:-1]).strip()
    return f"```python\n{code}\n```" if code else stripped  # an empty last block stops their rollout: shown as is


def view_steps(t, style: str = "authors") -> int:
    """How many steps the analyzer's view numbers: the authors' view adds a pseudo-step where the context ran out."""
    return len(t.steps) + (style == "authors" and bool(getattr(t, "overflow", None)))


def overflow_step(t, bench: str) -> str:
    """The authors' step for a rollout stopped by the context limit (_build_context_exceeded_step): no action, the
    reason as the environment output, an Info line."""
    tokens, budget = t.overflow
    info = json.dumps({"context_exceeded": True, "prompt_tokens": tokens, "max_prompt_tokens": budget},
                      ensure_ascii=False, sort_keys=True)
    reason = (f"Rollout stopped before generation because the {BENCH_NAMES.get(bench, bench)} conversation exceeded "
              f"the prompt token budget ({tokens} > {budget}).")
    return "\n".join([f"Step {len(t.steps) + 1}", "Assistant action:\n", f"Environment output:\nUSER:\n{reason}",
                      "Step reward: 0.0", "Terminated: False", f"Info: {info}"])


def render_episode(t, split: str = "train", max_chars: int = MAX_TRAJ_CHARS, bench: str = "bfcl") -> str:
    """The authors' view of a rollout `t` (task_id, messages, steps with .text and .output, reward, status, and
    overflow: [prompt tokens, budget] when the context limit stopped it, tools: the schemas the chat template got).

    Header (task id, split, final reward, success, terminated), the initial prompt unclipped (system prompt with
    the tool schemas, first query; under the friendly protocol the template's schemas are listed: with_tools),
    the step log clipped to its last max_chars characters (outputs under the authors' roles, AppWorld actions as
    they store them, their pseudo-step after a context overflow), and the last environment output of a failed run."""
    success = t.reward >= SUCCESS_REWARD
    terminated = t.status == "completed"
    blocks = []
    for i, s in enumerate(t.steps):
        last = i == len(t.steps) - 1
        reward = float(t.reward) if last and terminated else 0.0     # the env's reward arrives with termination
        action = appworld_action(s.text) if bench == "appworld" else s.text.strip()
        parts = [f"Step {i + 1}", f"Assistant action:\n{action}"]
        if format_messages(stringified(s.output)):
            parts.append(f"Environment output:\n{format_messages(stringified(s.output))}")
        parts += [f"Step reward: {reward}", f"Terminated: {last and terminated}"]
        blocks.append("\n".join(parts))
    if getattr(t, "overflow", None):
        blocks.append(overflow_step(t, bench))
    log = clip_tail("\n\n".join(blocks), max_chars)
    tools = getattr(t, "tools", None) or []  # friendly protocol: the schemas the chat template showed the policy
    parts = [f"Task id: {t.task_id}", f"Dataset: {split}", f"Final reward: {float(t.reward)}",
             f"Success: {success}", f"Terminated: {terminated}",
             f"Initial task prompt:\n{format_messages(with_tools(initial_messages(t.messages), tools))}",
             f"Attempt trajectory:\n{log}"]
    last_output = "\n".join(str(m.get("content", "")) for m in t.steps[-1].output).strip() if t.steps else ""
    if not success and t.status != "overflow" and last_output:
        parts.append(f"Last environment feedback:\n{last_output}")
    return "\n\n".join(parts)


def authors_messages(t, bench: str, variant: str, k: int = 3, split: str = "train") -> list[dict]:
    """The authors' analyzer chat: Multi (up to k problematic steps, earliest first, each feedback under three
    sentences) or Single (the first failing step, its own one-entry format)."""
    name, text = BENCH_NAMES.get(bench, bench), render_episode(t, split, bench=bench)
    kind = "function-calling" if bench == "bfcl" else "tool-use"
    mistakes = " — wrong tool, wrong arguments, or missing required call" if bench == "bfcl" else ""
    if variant == "single":
        system = (f"You analyze failed {name} {kind} trajectories. Identify the FIRST step where the agent made a "
                  f"mistake{mistakes}. Write the feedback in less than three sentences. "
                  "Output valid JSON only, no other text.")
        user = (f"Review this failed {name} {'multi-turn ' if bench == 'bfcl' else ''}attempt and identify the "
                f"first problematic step.\n\n{text}\n\nOutput format (JSON only, no other text):\n"
                '{"failure_step": <1-indexed step number>, "feedback": "<correction sentence(s)>"}')
    else:
        system = (f"You analyze failed {name} {kind} trajectories. Identify up to {k} problematic steps where the "
                  f"agent made mistakes{mistakes} (between 1 and {k} steps total, ordered earliest first). For EACH "
                  "problematic step, write a distinct correction in less than three sentences that targets only "
                  "that step's mistake. Output valid JSON only, no other text.")
        user = (f"Review this failed {name} {'multi-turn ' if bench == 'bfcl' else ''}attempt and identify the "
                "problematic steps. Return one (step, feedback) pair per problematic step.\n\n"
                f"{text}\n\nOutput format (JSON only, no other text):\n"
                '{"failures": [{"step": <1-indexed step number>, "feedback": "<correction for this step>"}, ...]}')
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]

# ----------------------------------------------------------------------------- compact view

def _blocks(messages: list[dict]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split a chat into the task (user messages before step 1) and (label, text) blocks."""
    task, blocks, step = [], [], 0
    for msg in messages:
        role = msg.get("role")
        if role == "assistant":
            step += 1
            blocks.append((f"Step {step} (assistant): ", _text(msg)))
        elif role == "user" and step == 0:
            task.append(_text(msg))
        elif role == "user":
            blocks.append(("User: ", _text(msg)))
        elif role == "tool" and step > 0:
            blocks.append(("Output: ", _text(msg)))
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
    """Compact text of one rollout: task, numbered steps with their outputs, final outcome.
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
    """Number of agent steps (assistant messages) in a chat; valid step numbers are 1..count_steps."""
    return sum(1 for m in messages if m.get("role") == "assistant")


SYSTEM_PROMPT = ("You review runs of an AI agent that uses tools. You find the steps where the "
                 "agent went wrong and say what it should have done instead.")

INSTRUCTIONS = """Read the whole run above. It failed. Find at most {k} {steps} where the agent made a mistake \
that caused the failure.
Rules:
- Prefer the step where the mistake started (the root cause) over later steps that only suffer from it.
- Use the step numbers shown in the run (1 to {n}).
- For each step, write one or two sentences to the agent that say what it should have done at that step. \
Start with "You should".
- Answer with JSON only, earliest step first, in this form:
{{"failures": [{{"step": <step number>, "feedback": "You should <the right action for that step>."}}]}}
Replace the <...> parts with your own analysis of this run."""


def compact_messages(messages: list[dict], reward: float, k: int = 3) -> list[dict]:
    """Chat that asks for up to k failure-relevant steps of a failed rollout (k=3 Multi, k=1 Single)."""
    user = ("Here is the run:\n\n" + render_trajectory(messages, reward) + "\n\n"
            + INSTRUCTIONS.format(k=k, steps="step" if k == 1 else "steps", n=count_steps(messages)))
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def blank_requests(t):
    """Rollout t with its chat's user messages blanked ("N/A"): the analyzer's view without the request, whose
    answers are a content-free prior (hintsd.pick_tool)."""
    return dataclasses.replace(t, messages=[{**m, "content": "N/A"} if m["role"] == "user" else m
                                            for m in t.messages])


def analyzer_messages(t, bench: str = "bfcl", variant: str = "multi", style: str = "authors", split: str = "train",
                      k: int = 3) -> list[dict]:
    """The analyzer's chat for a failed rollout t, in the given --analyzer-prompt style."""
    k = 1 if variant == "single" else k
    if style == "authors":
        return authors_messages(t, bench, variant, k, split)
    return compact_messages(t.messages, t.reward, k)

# ----------------------------------------------------------------------------- parsers (0-based steps out)

def remove_thinking(text: str) -> str:
    """Drop <think>...</think> blocks (and an unopened ...</think>) before parsing, as the authors do. One pass of
    str.find: linear in the text (a regex with a lazy .*? is quadratic on many unclosed tags)."""
    if "</think>" not in text:
        return text
    out, pos = [], 0
    while (i := text.find("<think>", pos)) >= 0 and (j := text.find("</think>", i)) >= 0:
        out.append(text[pos:i])
        pos = j + len("</think>")
        while pos < len(text) and text[pos].isspace():
            pos += 1
    text = "".join(out) + text[pos:]
    return text[text.index("</think>") + len("</think>"):].lstrip() if "</think>" in text else text


def _outer_object(text: str):
    """The authors' JSON extraction: json.loads of the first '{' to the last '}'; None if that fails."""
    text = remove_thinking(text[:MAX_PARSE_CHARS]).strip()
    start, end = text.find("{"), text.rfind("}")
    if start == -1 or end <= start:
        return None
    try:
        obj = json.loads(text[start:end + 1])
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _step_number(value) -> int | None:
    """An int or float step number (the authors accept both; a non-finite float is a failure)."""
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not value == value or
                                               value in (float("inf"), float("-inf"))):
        return None
    return int(value)


def parse_strict(text, n_steps: int, variant: str = "multi", k: int = 3) -> list[tuple[int, str]] | None:
    """The authors' parsers. Multi: {"failures": [{"step", "feedback"}, ...]} (or their legacy
    {"failure_steps"/"failure_step", "feedback"}); Single: {"failure_step", "feedback"}. Out-of-range and
    duplicate steps are dropped, the rest sorted, at most k kept. Returns [(step0, feedback)], or None when the
    answer gives no target."""
    if not isinstance(text, str):
        return None
    obj = _outer_object(text)
    if obj is None:
        return None
    if variant == "single":
        step, fb = _step_number(obj.get("failure_step")), obj.get("feedback", "")
        if step is None or not isinstance(fb, str) or not 1 <= step <= n_steps or not fb.strip():
            return None
        return [(step - 1, fb.strip())]
    entries = obj.get("failures")
    if not isinstance(entries, list):  # legacy: several steps sharing one feedback
        fb, steps = obj.get("feedback"), obj.get("failure_steps")
        if not isinstance(steps, list):
            steps = [obj["failure_step"]] if isinstance(obj.get("failure_step"), (int, float)) else None
        if not (isinstance(fb, str) and fb.strip() and isinstance(steps, list)):
            return None
        entries = [{"step": s, "feedback": fb} for s in steps if isinstance(s, (int, float))]
    found = {}
    for e in entries:
        if not isinstance(e, dict):
            continue
        step, fb = _step_number(e.get("step")), e.get("feedback", "")
        if step is None or not isinstance(fb, str) or not 1 <= step <= n_steps or not fb.strip() or step in found:
            continue
        found[step] = fb.strip()
    return [(s - 1, fb) for s, fb in sorted(found.items())][:max(k, 1)] or None


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


STEP_TEXT = re.compile(r"(?:step|turn)?[\s#:_-]*(\d{1,6})\.?", flags=re.I)


def _as_step(value) -> int | None:
    """A 1-based step number from an int, an integral float, or a short string such as "3" or "Step 3"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and len(value) <= 64:  # bounded first: a long string never reaches the regex
        m = STEP_TEXT.fullmatch(value.strip())
        return int(m.group(1)) if m else None
    return None


def _clean(entries: list[dict], n_steps: int, k: int) -> list[tuple[int, str]]:
    """Valid (step0, feedback) pairs: step in 1..n_steps, non-empty feedback, first per step, sorted by step,
    at most k."""
    found = {}
    for entry in entries:
        step, feedback = _as_step(_lookup(entry, STEP_KEYS)), _lookup(entry, FEEDBACK_KEYS)
        if step is None or not 1 <= step <= n_steps or step in found:
            continue
        if isinstance(feedback, str) and feedback.strip():
            found[step] = feedback.strip()[:MAX_FEEDBACK_CHARS].rstrip()
    return [(s - 1, fb) for s, fb in sorted(found.items())][:max(k, 0)]


def parse_lenient(text, n_steps: int, k: int = 3) -> list[tuple[int, str]]:
    """[(step0, feedback), ...] from an analyzer's raw answer, forgiving about format; [] for anything unusable."""
    try:
        if not isinstance(text, str) or not text.strip():
            return []
        text = remove_thinking(text[:MAX_PARSE_CHARS])
        for chunk in _chunks(text):
            for attempt in (chunk, _repair(chunk)):
                found = _clean([e for v in _json_values(attempt.strip()) for e in _entries(v)], n_steps, k)
                if found:
                    return found
        return []
    except Exception:                   # a parser bug must never stop training
        return []


def parse_analysis(text, n_steps: int, variant: str = "multi", parser: str = "strict", k: int = 3,
                   forced: bool = False) -> list[tuple[int, str]]:
    """The targets an analyzer's answer names: [(step0, feedback)], earliest first; [] = a parse failure. forced:
    the answer began with a forced opening and step number (hintsd.forced_answers); if its JSON never closes, its
    first entry is still read."""
    k = 1 if variant == "single" else k
    try:
        found = parse_lenient(text, n_steps, k) if parser == "lenient" else parse_strict(text, n_steps, variant, k)
    except Exception:                   # the strict parser follows the authors; it must not stop training either
        found = None
    return found or (forced_entry(text, n_steps) if forced else [])


FORCED_ENTRY = re.compile(r'\{"(?:failures": \[\{"step|failure_step)": (\d+), "feedback": "((?:[^"\\]|\\.)*)')


def forced_entry(text, n_steps: int) -> list[tuple[int, str]]:
    """The first (step0, feedback) of a forced answer: its forced step and the feedback up to the closing quote
    (or the end); [] if the feedback is empty."""
    m = FORCED_ENTRY.match(text[:MAX_PARSE_CHARS]) if isinstance(text, str) else None
    if not m or not 1 <= int(m[1]) <= n_steps:
        return []
    try:
        feedback = json.loads(f'"{m[2]}"')
    except ValueError:                  # a broken escape at the cut: keep the raw text
        feedback = m[2]
    feedback = feedback.strip()[:MAX_FEEDBACK_CHARS].rstrip()
    return [(int(m[1]) - 1, feedback)] if feedback else []

# ----------------------------------------------------------------------------- a rollout's steps as text

def output_text(s) -> str:
    """What the environment answered a step (a hintsd.Step), as text."""
    return "\n".join(str(m.get("content", "")) for m in s.output)


def step_outputs(t) -> list[str]:
    return [output_text(s) for s in t.steps]


def step_requests(t) -> list[str]:
    """The user request each step answers: the first query, or the new turn's message that ended the last turn."""
    requests = {0: next((str(m["content"]) for m in t.messages if m["role"] == "user"), "")}
    for s, nxt in zip(t.steps, t.steps[1:]):
        if nxt.turn != s.turn:
            requests[nxt.turn] = output_text(s)
    return [requests.get(s.turn, "") for s in t.steps]


BLANK_FEEDBACK = "Your previous attempt at this step did not lead to success."


def env_feedback(t, k: int, blank: bool = False) -> list[tuple[int, str]]:
    """Table-3 'environment output' source, no analyzer: the first k steps whose output is an error (else the
    last step), with the raw output as the feedback. Steps are 0-based. blank: the same steps, BLANK_FEEDBACK
    (the `blank` source: a control that says where, not what)."""
    outs = step_outputs(t)
    errs = [i for i, o in enumerate(outs) if "error" in o.lower()][:k] or [len(outs) - 1]
    return [(i, BLANK_FEEDBACK if blank else env_answer(t.steps[i])) for i in errs]


def env_answer(s) -> str:
    """The `env` source's feedback on one step: the environment's raw answer (its first 500 characters)."""
    if not s.output:  # BFCL: an action without a call that ended the episode, so nothing came back
        return "Your previous attempt at this step called no tool, and the task ended there without success."
    return f"The environment answered your previous attempt with: {output_text(s)[:500] or '(no output)'}"


# ----------------------------------------------------------------------------- the per-step judge (OpenClaw-RL)

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
- "hint": "" when the score is 1; otherwise one sentence to the agent, starting with "You should", that says \
what it should have done instead at this step."""
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
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?1\s*", value[:16]):
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

# ----------------------------------------------------------------------------- an analyzer behind an endpoint

def ask_endpoint(url: str, model_name: str, chats: list[list[dict]], max_tokens: int, temperature: float,
                 top_p: float, timeout: float, retries: int = 3) -> list[str]:
    """Answers from an OpenAI-compatible chat-completions endpoint (the standard library's HTTP client; the key,
    if any, from $HINTSD_ANALYZER_KEY only). Each request takes at most `timeout` seconds, retries included; its
    answer is cut to max_tokens * CHARS_PER_TOKEN characters. Any failure of the service (a timeout, an HTTP error or a
    redirect, a malformed or oversized reply) is retried while time is left, then gives "" (a parse failure): an
    outside service never stops training."""
    key = os.environ.get("HINTSD_ANALYZER_KEY")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    max_chars = max_tokens * CHARS_PER_TOKEN

    def ask(chat):
        body = json.dumps({"model": model_name, "messages": chat, "max_tokens": max_tokens,
                           "temperature": temperature, "top_p": top_p}).encode()
        deadline = time.monotonic() + timeout
        for attempt in range(retries):
            try:
                reply = http_post(url, body, headers, deadline, MAX_REPLY_BYTES + 12 * max_chars)
                text = json.loads(reply)["choices"][0]["message"]["content"]
                return text[:max_chars] if isinstance(text, str) else ""
            except Exception as e:  # noqa: BLE001 -- whatever the service sends: HTTPException, RecursionError, ...
                print(f"[hintsd] analyzer endpoint: {type(e).__name__}: {str(e)[:200]} (try {attempt + 1}/{retries})",
                      file=sys.stderr)
            left = deadline - time.monotonic()
            if left <= 0 or attempt + 1 == retries:
                break
            time.sleep(min(2 ** attempt, 10, left))
        return ""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(ask, chats))


def http_post(url: str, body: bytes, headers: dict, deadline: float, max_bytes: int) -> bytes:
    """The body of a 2xx reply to one POST, bounded: no redirect is followed (the key goes to `url`'s host only),
    the exchange ends by `deadline` (time.monotonic(); a watchdog shuts the socket), at most max_bytes are read."""
    parts = urllib.parse.urlsplit(url)
    kind = {"http": http.client.HTTPConnection, "https": http.client.HTTPSConnection}.get(parts.scheme)
    if kind is None or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    conn, watchdog = kind(parts.hostname, parts.port, timeout=max(deadline - time.monotonic(), 0.01)), None
    try:
        conn.connect()
        watchdog = threading.Timer(max(deadline - time.monotonic(), 0), shutdown_socket, [conn.sock])
        watchdog.start()
        conn.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body, headers)
        r = conn.getresponse()
        if not 200 <= r.status < 300:
            raise ValueError(f"HTTP {r.status}{' (redirects are not followed)' if 300 <= r.status < 400 else ''}")
        data = r.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ValueError(f"reply longer than {max_bytes} bytes")
    finally:
        if watchdog:
            watchdog.cancel()
        conn.close()
    if time.monotonic() >= deadline:  # the watchdog cut the reply short
        raise TimeoutError("no whole reply in time")
    return data


def shutdown_socket(sock) -> None:
    """End every read on a socket now (from the watchdog thread)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already closed
        pass
