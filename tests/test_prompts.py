"""Tests for prompts.py: trajectory rendering, the analyzer prompt and the answer parser."""
import json
import os
import random
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prompts import (CLIP_MARKER, MAX_FEEDBACK_CHARS, analyzer_messages, count_steps,  # noqa: E402
                     feedback_message, parse_analysis, render_trajectory)


def chat(n_steps=3, big=0):
    """A small BFCL-like failed rollout with n_steps assistant steps, each followed by a tool output."""
    msgs = [{"role": "system", "content": "TOOL DOCS " * 50},
            {"role": "user", "content": "Move report.txt into the archive folder."}]
    for i in range(1, n_steps + 1):
        msgs.append({"role": "assistant", "content": f'<tool_call>{{"name": "cmd{i}"}}</tool_call>' + "a" * big})
        msgs.append({"role": "tool", "content": f"result-{i}"})
    msgs.append({"role": "user", "content": "Now list the folder."})
    msgs.append({"role": "assistant", "content": "I cannot. FINAL-ANSWER"})
    return msgs

# -----------------------------------------------------------------------------
# render_trajectory

def test_render_numbers_steps_and_outputs():
    text = render_trajectory(chat(3), 0.0)
    assert text.startswith("Task:\nMove report.txt into the archive folder.")
    for i in range(1, 4):
        assert f'Step {i} (assistant): <tool_call>{{"name": "cmd{i}"}}</tool_call>' in text
        assert f"Output: result-{i}" in text
    assert "User: Now list the folder." in text
    assert "Step 4 (assistant): I cannot. FINAL-ANSWER" in text
    assert text.endswith("Outcome: FAILED (reward 0.0)")
    assert "TOOL DOCS" not in text               # the system prompt is left out
    # order: step 1 < its output < step 2 < ... < follow-up user < last step
    order = [text.index(s) for s in ("Step 1 (", "Output: result-1", "Step 2 (", "Output: result-3",
                                     "User: Now", "Step 4 (")]
    assert order == sorted(order)
    assert count_steps(chat(3)) == 4


def test_render_success_outcome_and_structured_tool_calls():
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "ls"}}]},
            {"role": "tool", "content": "x"}]
    text = render_trajectory(msgs, 1.0)
    assert '"name": "ls"' in text and text.endswith("Outcome: SUCCESS (reward 1.0)")


def test_render_no_clip_when_short():
    text = render_trajectory(chat(3), 0.0)
    assert CLIP_MARKER not in text


@pytest.mark.parametrize("max_chars", [300, 1000, 5000, 12_000])
def test_render_clips_from_the_front(max_chars):
    msgs = chat(80, big=200)                            # about 20k characters
    text = render_trajectory(msgs, 0.0, max_chars=max_chars)
    assert len(text) <= max_chars
    assert text.startswith("Task:\nMove report.txt")     # task header kept
    assert CLIP_MARKER in text
    assert "Step 1 (assistant)" not in text              # early steps gone ...
    assert text.endswith("Step 81 (assistant): I cannot. FINAL-ANSWER\nOutcome: FAILED (reward 0.0)")
    # ... and every kept line starts with a whole label, never a cut one
    for line in text.split(CLIP_MARKER)[1].strip().splitlines():
        assert line.startswith(("Step ", "Output: ", "User: ", "Outcome: ")), line


def test_render_clips_inside_one_huge_step_keeps_its_header():
    msgs = [{"role": "user", "content": "task"},
            {"role": "assistant", "content": "b" * 50_000 + "THE-END"}]
    text = render_trajectory(msgs, 0.0, max_chars=2000)
    assert len(text) <= 2000
    assert "Step 1 (assistant): ..." in text and "THE-END\nOutcome: FAILED" in text


def test_render_huge_task_is_capped():
    msgs = [{"role": "user", "content": "t" * 100_000}, {"role": "assistant", "content": "x"}]
    text = render_trajectory(msgs, 0.0, max_chars=4000)
    assert len(text) <= 4000 and "Step 1 (assistant): x" in text


def test_render_empty_chat():
    assert render_trajectory([], 0.0).endswith("Outcome: FAILED (reward 0.0)")

# -----------------------------------------------------------------------------
# analyzer_messages and feedback_message

@pytest.mark.parametrize("k", [1, 3])
def test_analyzer_messages(k):
    msgs = chat(3)
    out = analyzer_messages(msgs, 0.0, k=k, tool_names=["mv", "ls"])
    assert [m["role"] for m in out] == ["system", "user"]
    user = out[-1]["content"]
    assert render_trajectory(msgs, 0.0) in user
    assert f"at most {k} step" in user
    assert "mv, ls" in user and '"failures"' in user and '"feedback"' in user
    assert "1 to 4" in user                            # the valid step range


def test_analyzer_example_is_a_template_that_a_verbatim_copy_cannot_pass():
    """Small models copy examples. A concrete example once came back verbatim as 'the' analysis for every
    rollout; with placeholders a copy is a counted parse failure instead of a fake target."""
    user = analyzer_messages(chat(3), 0.0)[-1]["content"]
    example = user[user.rindex('{"failures"'):]
    assert "<step number>" in example and parse_analysis(example, n_steps=3) == []
    filled = example.replace("<step number>", "2").replace("<the right action for that step>", "call ls")
    assert parse_analysis(filled, n_steps=3) == [(2, "You should call ls.")]


def test_feedback_message():
    m = feedback_message("  You should call ls first. ")
    assert m["role"] == "user" and m["content"].endswith("You should call ls first.")

# -----------------------------------------------------------------------------
# parse_analysis

FB = "You should call ls first."
CASES = [
    # clean
    ('{"failures": [{"step": 2, "feedback": "%s"}]}' % FB, [(2, FB)]),
    # code fence, with and without the language tag, text around
    ('Here is my analysis:\n```json\n{"failures": [{"step": 1, "feedback": "a"}]}\n```\nHope it helps!', [(1, "a")]),
    ('```\n{"failures": [{"step": 1, "feedback": "a"}]}\n```', [(1, "a")]),
    ('```json\n{"failures": [{"step": 1, "feedback": "a"}]}', [(1, "a")]),              # unclosed fence
    # prose around, no fence
    ('Sure! The answer is {"failures": [{"step": 3, "feedback": "b"}]} -- done.', [(3, "b")]),
    # single object, bare list
    ('{"step": 2, "feedback": "c"}', [(2, "c")]),
    ('[{"step": 2, "feedback": "c"}, {"step": 1, "feedback": "d"}]', [(1, "d"), (2, "c")]),
    # several separate objects in prose
    ('Step A: {"step": 4, "feedback": "x"}\nStep B: {"step": 1, "feedback": "y"}', [(1, "y"), (4, "x")]),
    # numbers as strings / "Step 3" / floats; bools are not numbers
    ('{"failures": [{"step": "3", "feedback": "e"}, {"step": "Step 1", "feedback": "f"}]}', [(1, "f"), (3, "e")]),
    ('{"failures": [{"step": 2.0, "feedback": "e"}, {"step": true, "feedback": "f"}]}', [(2, "e")]),
    ('{"failures": [{"step": "two", "feedback": "e"}, {"step": 2.5, "feedback": "f"}]}', []),
    # alternative keys, capitalised keys, alternative wrapper
    ('{"failures": [{"turn": 2, "hint": "g"}, {"step_id": 3, "correction": "h"}]}', [(2, "g"), (3, "h")]),
    ('{"errors": [{"Step": 1, "Fix": "i"}]}', [(1, "i")]),
    ('{"analysis": {"failures": [{"step": 1, "feedback": "j"}]}}', [(1, "j")]),
    # out of range, duplicates (keep the first), more than k, unsorted
    ('{"failures": [{"step": 0, "feedback": "a"}, {"step": 9, "feedback": "b"}, {"step": -1, "feedback": "c"}]}', []),
    ('{"failures": [{"step": 2, "feedback": "first"}, {"step": 2, "feedback": "second"}]}', [(2, "first")]),
    ('{"failures": [{"step": 5, "feedback": "e"}, {"step": 4, "feedback": "d"}, {"step": 3, "feedback": "c"},'
     ' {"step": 2, "feedback": "b"}, {"step": 1, "feedback": "a"}]}', [(1, "a"), (2, "b"), (3, "c")]),
    # empty / missing / non-string feedback
    ('{"failures": [{"step": 1, "feedback": "   "}, {"step": 2}, {"step": 3, "feedback": 7}]}', []),
    ('{"failures": [{"step": 1, "feedback": ""}, {"step": 1, "feedback": "later"}]}', [(1, "later")]),
    # whitespace is stripped
    ('{"failures": [{"step": 1, "feedback": "  k  "}]}', [(1, "k")]),
    # small repairs: trailing commas, single quotes, Python literals
    ('{"failures": [{"step": 1, "feedback": "a",},],}', [(1, "a")]),
    ("{'failures': [{'step': 2, 'feedback': 'b'}]}", [(2, "b")]),
    ("[{'step': 2, 'feedback': 'b', 'fatal': True}]", [(2, "b")]),
    # truncated answer (generation hit max tokens): keep the complete entries
    ('{"failures": [{"step": 1, "feedback": "a"}, {"step": 3, "feedback": "b"}, {"step": 4, "feed', [(1, "a"), (3, "b")]),
    # empty wrapper, garbage, non-JSON
    ('{"failures": []}', []),
    ("", []), ("   \n ", []), ("no json here at all", []), ("{", []), ("}{][", []), ("null", []),
    ("[1, 2, 3]", []), ('"step 2"', []), ("```json\n```", []), ("{step: 2, feedback: x}", []),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_parse_cases(text, expected):
    assert parse_analysis(text, n_steps=5, k=3) == expected


def test_parse_k_and_n_steps():
    text = json.dumps({"failures": [{"step": s, "feedback": f"f{s}"} for s in (4, 2, 7)]})
    assert parse_analysis(text, n_steps=5, k=1) == [(2, "f2")]      # Single: the earliest step
    assert parse_analysis(text, n_steps=10, k=3) == [(2, "f2"), (4, "f4"), (7, "f7")]
    assert parse_analysis(text, n_steps=3, k=3) == [(2, "f2")]
    assert parse_analysis(text, n_steps=0, k=3) == []
    assert parse_analysis(text, n_steps=5, k=0) == []


def test_parse_caps_feedback_length():
    text = json.dumps({"step": 1, "feedback": "z" * 5000})
    [(step, fb)] = parse_analysis(text, n_steps=1)
    assert step == 1 and len(fb) == MAX_FEEDBACK_CHARS


@pytest.mark.parametrize("bad", [None, 3, b'{"step": 1, "feedback": "a"}', ["x"], {"step": 1}])
def test_parse_non_string_input(bad):
    assert parse_analysis(bad, n_steps=3) == []


@pytest.mark.parametrize("junk", [
    "[" * 100_000, "{" * 100_000, '{"a":' * 100_000, "[" * 500 + "]" * 500,
    "x" * 1_000_000, "`" * 1_000_000, "{[" * 500_000, '"' * 1_000_000,
    ('{"step": 1, "feedback": "a"} ' * 40_000),          # 1MB of valid objects
    "[" * 200 + "1, " * 20_000,                          # every start scans far before failing
])
def test_parse_big_and_deep_junk_is_fast_and_safe(junk):
    t0 = time.time()
    out = parse_analysis(junk, n_steps=3)
    assert time.time() - t0 < 5.0
    assert isinstance(out, list) and len(out) <= 3


PIECES = ['{"failures": [', '{"step": ', '"step": "2"', '1', '3', '"feedback": "You should x"', '}', ']',
          ',', '```json\n', '```', "'", '"', 'Step 2', 'true', 'null', '\n', ' ', '{', '[', ':', '\\',
          '"hint": "h"', '"turn": 4', '\u00e9\u4e2d', '\x00', 'NaN', '1e999', '-0', '99999999999']


def fuzz_text(rng):
    """Either a random splice of JSON-ish pieces, or a well-formed answer in a random wrapping."""
    if rng.random() < 0.5:
        return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 30)))
    entries = [{rng.choice(["step", "turn", "Step"]): rng.choice([rng.randint(-1, 8), str(rng.randint(0, 8))]),
                rng.choice(["feedback", "hint"]): rng.choice(["You should y.", " ", "z" * 600])}
               for _ in range(rng.randint(0, 5))]
    body = json.dumps(rng.choice([{"failures": entries}, entries, entries[0] if entries else {}]))
    return rng.choice(["{}", "```json\n{}\n```", "Answer: {} Thanks.", "{}\n{}"]).format(body, body)


def test_parse_fuzz_never_raises():
    """Random inputs, half of them mutated (sliced, duplicated, spliced) well-formed answers.
    Fixed seed; hypothesis is not installed in the venv."""
    rng = random.Random(0)
    n_found = 0
    for _ in range(3000):
        text = fuzz_text(rng)
        if text and rng.random() < 0.3:                    # drop, duplicate or splice a random slice
            i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
            text = text[:i] + rng.choice([text[i:j] * 2, "", rng.choice(PIECES)]) + text[j:]
        n, k = rng.randint(0, 6), rng.randint(0, 4)
        out = parse_analysis(text, n_steps=n, k=k)
        assert isinstance(out, list) and len(out) <= max(k, 0)
        steps = [s for s, _ in out]
        assert steps == sorted(set(steps))
        for step, fb in out:
            assert type(step) is int and 1 <= step <= n
            assert isinstance(fb, str) and fb == fb.strip() and 0 < len(fb) <= MAX_FEEDBACK_CHARS
        n_found += bool(out)
    assert n_found > 300                                   # the fuzz also reaches the success path


def test_parse_capped_feedback_has_no_trailing_space():
    text = json.dumps({"step": 1, "feedback": "z" * (MAX_FEEDBACK_CHARS - 1) + " tail"})
    [(_, fb)] = parse_analysis(text, n_steps=1)
    assert fb == fb.strip() and fb.startswith("z")
