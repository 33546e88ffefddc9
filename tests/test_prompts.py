"""Tests for prompts.py: the authors' and the compact analyzer views, the strict (authors') and lenient answer
parsers, and the teacher's feedback message. Steps are 0-based in Python, 1-based in prompts and answers."""
import json
import math
import os
import random
import sys
import time
from types import SimpleNamespace as NS

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prompts import (AUTHORS_CLIP_MARKER, CLIP_MARKER, MAX_FEEDBACK_CHARS, MAX_TRAJ_CHARS,  # noqa: E402
                     analyzer_messages, authors_messages, compact_messages, count_steps, feedback_message,
                     format_messages, parse_analysis, parse_lenient, parse_strict, render_episode,
                     render_trajectory)


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


SYSTEM = '\n\n# Tools\nYou may call functions.\n<tools>\n{"name":"ls","parameters":{}}\n{"name":"rm"}\n</tools>\n'
QUERY = "List the files."


def episode(steps, reward=0.0, status="max_steps", system=SYSTEM, query=QUERY, task_id="multi_turn_base_3"):
    """A hand-built trajectory as prompts.py reads it: steps = [(action text, [env messages])]."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": query}]
    for text, output in steps:
        messages += [{"role": "assistant", "content": text}, *output]
    return NS(task_id=task_id, messages=messages, reward=reward, status=status,
              steps=[NS(text=text, output=output) for text, output in steps])


LS_RESULT = '<tool_call>\n{"name": "ls_1", "content": "a.txt"}\n</tool_call>\n'
SMALL = [(' <tool_call>{"name": "ls"}</tool_call> ', [{"role": "user", "content": LS_RESULT}]),
         ("Done.", [{"role": "user", "content": ""}, {"role": "user", "content": "Now remove a.txt."}]),
         ("I cannot.", [])]

# -----------------------------------------------------------------------------
# render_episode: the authors' view


SMALL_TEXT = """Task id: multi_turn_base_3

Dataset: train

Final reward: 0.0

Success: False

Terminated: False

Initial task prompt:
SYSTEM:
# Tools
You may call functions.
<tools>
{"name":"ls","parameters":{}}
{"name":"rm"}
</tools>

USER:
List the files.

Attempt trajectory:
Step 1
Assistant action:
<tool_call>{"name": "ls"}</tool_call>
Environment output:
USER:
<tool_call>
{"name": "ls_1", "content": "a.txt"}
</tool_call>
Step reward: 0.0
Terminated: False

Step 2
Assistant action:
Done.
Environment output:
USER:
Now remove a.txt.
Step reward: 0.0
Terminated: False

Step 3
Assistant action:
I cannot.
Step reward: 0.0
Terminated: False"""


def test_render_episode_exact_text():
    """Header, initial prompt (ROLE:\\ncontent, stripped), one block per step; an empty env message is skipped,
    a step without output has no "Environment output"; no last feedback when the last step got no output."""
    assert render_episode(episode(SMALL)) == SMALL_TEXT


def test_render_episode_last_feedback_split_and_outcomes():
    err = [{"role": "user", "content": "Error during execution: name 'x' is not defined"}]
    done = [{"role": "user", "content": "[CONVERSATION_COMPLETED]"}]
    # failed at the step cap: the last environment output is repeated at the end
    text = render_episode(episode(SMALL[:2] + [("x()", err)]), split="eval")
    assert text.startswith("Task id: multi_turn_base_3\n\nDataset: eval\n\nFinal reward: 0.0\n\n"
                           "Success: False\n\nTerminated: False\n\n")
    assert text.endswith("Step 3\nAssistant action:\nx()\nEnvironment output:\nUSER:\n" + err[0]["content"]
                         + "\nStep reward: 0.0\nTerminated: False\n\nLast environment feedback:\n" + err[0]["content"])
    # completed but failed: terminated, the last step carries the (zero) reward, last feedback shown
    text = render_episode(episode(SMALL[:2] + [("bye", done)], status="completed"))
    assert "\n\nSuccess: False\n\nTerminated: True\n\n" in text
    assert "Step 2\nAssistant action:\nDone.\n" in text and "Terminated: False\n\nStep 3" in text
    assert text.endswith("Step 3\nAssistant action:\nbye\nEnvironment output:\nUSER:\n[CONVERSATION_COMPLETED]\n"
                         "Step reward: 0.0\nTerminated: True\n\nLast environment feedback:\n[CONVERSATION_COMPLETED]")
    # success: the final reward arrives with the last step; no last feedback
    text = render_episode(episode(SMALL[:2] + [("bye", done)], reward=1.0, status="completed"))
    assert "Final reward: 1.0\n\nSuccess: True\n\nTerminated: True\n\n" in text
    assert text.count("Step reward: 1.0") == 1 and text.count("Step reward: 0.0") == 2
    assert text.endswith("[CONVERSATION_COMPLETED]\nStep reward: 1.0\nTerminated: True")
    # overflow: no last feedback even though the last step has output
    text = render_episode(episode(SMALL[:2] + [("x()", err)], status="overflow"))
    assert "Last environment feedback" not in text and "Terminated: True" not in text
    # no steps at all (overflow before the first action)
    text = render_episode(episode([], status="overflow"))
    assert text.endswith("USER:\nList the files.\n\nAttempt trajectory:\n")


def test_render_episode_initial_prompt_stops_at_first_assistant():
    t = episode(SMALL)
    t.messages.insert(2, {"role": "user", "content": "A second user message before step 1."})
    text = render_episode(t)
    initial = text[text.index("Initial task prompt:\n"):text.index("Attempt trajectory:")]
    assert initial.endswith("USER:\nList the files.\n\nUSER:\nA second user message before step 1.\n\n")
    assert "Now remove" not in initial and "ls_1" not in initial


def long_episode(n_steps=60, doc_chars=30_000):
    docs = "\n".join(json.dumps({"name": f"tool_{i}", "description": "d" * 80}) for i in range(doc_chars // 120))
    system = "# Tools\n<tools>\n" + docs + "\n</tools>"
    steps = [(f"action {i} " + "a" * 300, [{"role": "user", "content": f"output {i} " + "o" * 100}])
             for i in range(n_steps)]
    return episode(steps, system=system), system


@pytest.mark.parametrize("max_chars", [1, 500, 2000, 12_000])
def test_render_episode_clips_the_log_tail_only(max_chars):
    t, system = long_episode()
    full = render_episode(t, max_chars=0)                    # max_chars <= 0: no clipping
    head_end = full.index("Attempt trajectory:\n") + len("Attempt trajectory:\n")
    tail_start = full.index("\n\nLast environment feedback:")
    head, log, tail = full[:head_end], full[head_end:tail_start], full[tail_start:]
    assert len(log) > 12_000 and AUTHORS_CLIP_MARKER not in full
    clipped = render_episode(t, max_chars=max_chars)
    assert clipped == head + AUTHORS_CLIP_MARKER + "\n" + log[-max_chars:] + tail
    assert system in clipped                                 # the tool schemas are never clipped
    assert tail == "\n\nLast environment feedback:\noutput 59 " + "o" * 100


def test_render_episode_default_clip_is_12k_and_short_logs_are_whole():
    t, _ = long_episode()
    assert MAX_TRAJ_CHARS == 12_000 and render_episode(t) == render_episode(t, max_chars=12_000)
    log = render_episode(t)[render_episode(t).index("Attempt trajectory:\n"):]
    assert log.startswith("Attempt trajectory:\n" + AUTHORS_CLIP_MARKER + "\n")
    assert "Step 60\nAssistant action:\naction 59" in log and "Step 1\n" not in log
    # a log of exactly max_chars characters is kept whole
    full = render_episode(episode(SMALL), max_chars=0)
    log = full[full.index("Attempt trajectory:\n") + len("Attempt trajectory:\n"):]
    assert render_episode(episode(SMALL), max_chars=len(log)) == full
    assert render_episode(episode(SMALL), max_chars=len(log) - 1) != full


def test_render_episode_huge_system_prompt_is_kept_whole():
    t, system = long_episode(n_steps=2, doc_chars=200_000)
    text = render_episode(t)
    assert len(system) > 150_000 and "SYSTEM:\n" + system + "\n\nUSER:\n" + QUERY in text
    assert AUTHORS_CLIP_MARKER not in text


def test_format_messages():
    msgs = [{"role": "system", "content": "  s  "}, {"role": "user", "content": ""}, {"content": "x"},
            {"role": "tool", "content": None}, {"role": "assistant", "content": None, "tool_calls": [{"name": "ls"}]}]
    assert format_messages(msgs) == 'SYSTEM:\ns\n\nUNKNOWN:\nx\n\nASSISTANT:\n[{"name": "ls"}]'
    assert format_messages([]) == ""

# -----------------------------------------------------------------------------
# the authors' analyzer prompts, against their strings (src/train/bfcl_feedback.py, appworld_feedback.py)


AUTHORS_SYSTEM = {
    ("bfcl", "multi"): "You analyze failed BFCL function-calling trajectories. Identify up to 3 problematic steps "
                       "where the agent made mistakes — wrong tool, wrong arguments, or missing required call "
                       "(between 1 and 3 steps total, ordered earliest first). For EACH problematic step, write a "
                       "distinct correction in less than three sentences that targets only that step's mistake. "
                       "Output valid JSON only, no other text.",
    ("bfcl", "single"): "You analyze failed BFCL function-calling trajectories. Identify the FIRST step where the "
                        "agent made a mistake — wrong tool, wrong arguments, or missing required call. Write the "
                        "feedback in less than three sentences. Output valid JSON only, no other text.",
    ("appworld", "multi"): "You analyze failed AppWorld tool-use trajectories. Identify up to 3 problematic steps "
                           "where the agent made mistakes (between 1 and 3 steps total, ordered earliest first). For "
                           "EACH problematic step, write a distinct correction in less than three sentences that "
                           "targets only that step's mistake. Output valid JSON only, no other text.",
    ("appworld", "single"): "You analyze failed AppWorld tool-use trajectories. Identify the FIRST step where the "
                            "agent made a mistake. Write the feedback in less than three sentences. Output valid "
                            "JSON only, no other text.",
}
AUTHORS_USER_HEAD = {
    ("bfcl", "multi"): "Review this failed BFCL multi-turn attempt and identify the problematic steps. "
                       "Return one (step, feedback) pair per problematic step.\n\n",
    ("bfcl", "single"): "Review this failed BFCL multi-turn attempt and identify the first problematic step.\n\n",
    ("appworld", "multi"): "Review this failed AppWorld attempt and identify the problematic steps. "
                           "Return one (step, feedback) pair per problematic step.\n\n",
    ("appworld", "single"): "Review this failed AppWorld attempt and identify the first problematic step.\n\n",
}
AUTHORS_FORMAT = {
    "multi": '\n\nOutput format (JSON only, no other text):\n{"failures": [{"step": <1-indexed step number>, '
             '"feedback": "<correction for this step>"}, ...]}',
    "single": '\n\nOutput format (JSON only, no other text):\n{"failure_step": <1-indexed step number>, '
              '"feedback": "<correction sentence(s)>"}',
}


@pytest.mark.parametrize("bench", ["bfcl", "appworld"])
@pytest.mark.parametrize("variant", ["multi", "single"])
def test_authors_prompts_match_their_strings(bench, variant):
    t = episode(SMALL)
    out = analyzer_messages(t, bench, variant)               # style="authors" is the default
    assert out == authors_messages(t, bench, variant, 3, "train")
    assert out == [{"role": "system", "content": AUTHORS_SYSTEM[bench, variant]},
                   {"role": "user", "content": AUTHORS_USER_HEAD[bench, variant] + render_episode(t)
                    + AUTHORS_FORMAT[variant]}]


def test_authors_prompt_k_and_split():
    t = episode(SMALL)
    system = analyzer_messages(t, "bfcl", "multi", k=2)[0]["content"]
    assert "Identify up to 2 problematic steps" in system and "(between 1 and 2 steps total" in system
    assert analyzer_messages(t, "bfcl", "single", k=5) == analyzer_messages(t, "bfcl", "single")
    user = analyzer_messages(t, "bfcl", "multi", split="eval")[1]["content"]
    assert render_episode(t, "eval") in user and "Dataset: eval" in user


@pytest.mark.parametrize("variant", ["multi", "single"])
def test_authors_format_line_copied_verbatim_is_a_parse_failure(variant):
    """A small analyzer that echoes the format line names no step: a counted failure, never a fake target."""
    echo = AUTHORS_FORMAT[variant].split("\n")[-1]
    for parser in ("strict", "lenient"):
        assert parse_analysis(echo, 5, variant, parser) == []
    filled = echo.replace("<1-indexed step number>", "2").replace(", ...", "")
    filled = filled.replace("<correction for this step>", "fix").replace("<correction sentence(s)>", "fix")
    assert parse_analysis(filled, 5, variant) == [(1, "fix")]

# -----------------------------------------------------------------------------
# the compact view: render_trajectory and compact_messages


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


@pytest.mark.parametrize("k", [1, 3])
def test_compact_messages(k):
    msgs = chat(3)
    out = compact_messages(msgs, 0.0, k=k)
    assert [m["role"] for m in out] == ["system", "user"]
    user = out[-1]["content"]
    assert render_trajectory(msgs, 0.0) in user
    assert f"at most {k} step{'s' if k > 1 else ''} where" in user
    assert '"failures"' in user and '"feedback"' in user
    assert "1 to 4" in user                            # the valid step range
    assert "TOOL DOCS" not in user                     # no tool schemas in the compact view


def test_analyzer_messages_compact_dispatch():
    t = NS(task_id="x", messages=chat(3), reward=0.0, status="max_steps", steps=[])
    assert analyzer_messages(t, style="compact") == compact_messages(chat(3), 0.0, 3)
    assert analyzer_messages(t, "bfcl", "multi", "compact", k=2) == compact_messages(chat(3), 0.0, 2)
    assert analyzer_messages(t, "bfcl", "single", "compact", k=3) == compact_messages(chat(3), 0.0, 1)
    assert analyzer_messages(t, "appworld", "single", "compact") == compact_messages(chat(3), 0.0, 1)


def test_compact_example_is_a_template_that_a_verbatim_copy_cannot_pass():
    """Small models copy examples. A concrete example once came back verbatim as 'the' analysis for every
    rollout; with placeholders a copy is a counted parse failure instead of a fake target."""
    user = compact_messages(chat(3), 0.0)[-1]["content"]
    example = user[user.rindex('{"failures"'):]
    assert "<step number>" in example
    assert parse_analysis(example, n_steps=3) == [] and parse_lenient(example, n_steps=3) == []
    filled = example.replace("<step number>", "2").replace("<the right action for that step>", "call ls")
    assert parse_analysis(filled, n_steps=3) == [(1, "You should call ls.")]
    assert parse_analysis(filled, n_steps=3, parser="lenient") == [(1, "You should call ls.")]

# -----------------------------------------------------------------------------
# feedback_message


def test_feedback_message():
    m = feedback_message("  You should call ls first. \n")
    assert m == {"role": "user",
                 "content": "Consider the following feedback to solve this step:\n\nYou should call ls first."}

# -----------------------------------------------------------------------------
# parse_strict: the authors' parsers


FB = "You should call ls first."
STRICT_MULTI = [
    # clean; step as int or float (int() truncates a float, as theirs does); feedback stripped
    ('{"failures": [{"step": 2, "feedback": "%s"}]}' % FB, [(1, FB)]),
    ('{"failures": [{"step": 2.0, "feedback": "a"}, {"step": 3.7, "feedback": " b "}]}', [(1, "a"), (2, "b")]),
    # out of range (0, -1, n+1, 0.5 -> 0), duplicates (the first non-empty one), empty feedback, sorted, at most k
    ('{"failures": [{"step": 0, "feedback": "a"}, {"step": 6, "feedback": "b"}, {"step": -1, "feedback": "c"},'
     ' {"step": 0.5, "feedback": "d"}]}', None),
    ('{"failures": [{"step": 2, "feedback": "first"}, {"step": 2.0, "feedback": "second"}]}', [(1, "first")]),
    ('{"failures": [{"step": 1, "feedback": "  "}, {"step": 1, "feedback": "later"}]}', [(0, "later")]),
    ('{"failures": [{"step": 5, "feedback": "e"}, {"step": 4, "feedback": "d"}, {"step": 3, "feedback": "c"},'
     ' {"step": 2, "feedback": "b"}, {"step": 1, "feedback": "a"}]}', [(0, "a"), (1, "b"), (2, "c")]),
    # entries without a number step or a string feedback are skipped; no "Step 2" strings, no other keys
    ('{"failures": [{"step": "2", "feedback": "a"}, {"step": "Step 3", "feedback": "b"}]}', None),
    ('{"failures": [{"step": 2, "feedback": 7}, {"step": 3}, {"turn": 4, "feedback": "x"}, "s", 5,'
     ' {"step": 1, "hint": "h"}]}', None),
    ('{"failures": [{"step": null, "feedback": "a"}, {"step": [2], "feedback": "b"}, {"step": 4, "feedback": "c"}]}',
     [(3, "c")]),
    ('{"failures": []}', None),
    ('{"Failures": [{"step": 1, "feedback": "a"}]}', None),
    # NaN / Infinity: json.loads accepts them; they fail (theirs would raise in int())
    ('{"failures": [{"step": NaN, "feedback": "a"}]}', None),
    ('{"failures": [{"step": Infinity, "feedback": "a"}, {"step": -Infinity, "feedback": "b"}]}', None),
    ('{"failures": [{"step": NaN, "feedback": "a"}, {"step": 2, "feedback": "b"}]}', [(1, "b")]),
    ('{"failures": [{"step": 1e400, "feedback": "a"}]}', None),                 # 1e400 is inf
    # booleans: True is an int in Python, so (like the authors' code) true is step 1; false is step 0
    ('{"failures": [{"step": true, "feedback": "a"}]}', [(0, "a")]),
    ('{"failures": [{"step": false, "feedback": "a"}]}', None),
    # their legacy formats: several steps or one step sharing one feedback
    ('{"failure_steps": [3, 1, 1, 9, "2"], "feedback": " shared "}', [(0, "shared"), (2, "shared")]),
    ('{"failure_steps": [2], "feedback": ""}', None),
    ('{"failure_steps": [], "feedback": "a"}', None),
    ('{"failure_steps": [NaN, 2], "feedback": "a"}', [(1, "a")]),
    ('{"failures": {"step": 1}, "failure_steps": [2], "feedback": "a"}', [(1, "a")]),  # "failures" not a list
    # a Single answer to the Multi parser: their legacy branch reads it
    ('{"failure_step": 2, "feedback": "a"}', [(1, "a")]),
    ('{"failure_step": 2.0, "feedback": "a"}', [(1, "a")]),
    ('{"failure_step": "2", "feedback": "a"}', None),
    ('{"failure_step": NaN, "feedback": "a"}', None),
    ('{"failure_step": 2}', None),
    # extraction: the first '{' to the last '}' must be one valid JSON object
    ('Here you go:\n```json\n{"failures": [{"step": 3, "feedback": "b"}]}\n```\nThe step 3 call was wrong.',
     [(2, "b")]),
    ('```json\n{"failures": [{"step": 3, "feedback": "b"}]}\n```\nNote: {not json}', None),
    ('{"failures": [{"step": 1, "feedback": "a"}]}\n{"failures": [{"step": 2, "feedback": "b"}]}', None),
    ('{"failures": [{"step": 1, "feedback": "a"}]} and {"step": 2}', None),
    ('[{"step": 2, "feedback": "c"}, {"step": 1, "feedback": "d"}]', None),    # a list of entries
    ('[{"step": 2, "feedback": "c"}]', None),                                    # a one-entry list: no wrapper
    ('[{"failures": [{"step": 2, "feedback": "c"}]}]', [(1, "c")]),            # the slice is the wrapper
    ('{"step": 2, "feedback": "c"}', None),                                      # a bare entry
    ('{"failures": [{"step": 1, "feedback": "a"}, {"step": 3, "feedback": "b"}, {"step": 4, "feed', None),  # cut
    ('{"failures": [{"step": 1, "feedback": "a"}]', None),                     # cut before the last brace
    ('{"failures": [{"step": 1, "feedback": "a",},],}', None),                # no repairs
    ("{'failures': [{'step': 2, 'feedback': 'b'}]}", None),
    ("{step: 2, feedback: x}", None),
    # <think> reasoning is removed first (also an unopened ...</think>); JSON only inside it does not count
    ('<think>Step 2 used the wrong path {maybe}.</think>\n{"failures": [{"step": 2, "feedback": "a"}]}',
     [(1, "a")]),
    ('The agent {erred}...</think>{"failures": [{"step": 2, "feedback": "a"}]}', [(1, "a")]),
    ('<think>{"failures": [{"step": 2, "feedback": "a"}]}</think>', None),
    ('<think>a</think><think>{b}</think> {"failures": [{"step": 4, "feedback": "d"}]}', [(3, "d")]),
    # junk
    ("", None), ("   ", None), ("no json", None), ("{", None), ("}{", None), ("{}", None), ("null", None),
    ("[1, 2]", None), ('"step 2"', None), ("```json\n```", None), ('{"failures": null}', None),
]


@pytest.mark.parametrize("text,expected", STRICT_MULTI)
def test_parse_strict_multi(text, expected):
    assert parse_strict(text, n_steps=5, variant="multi", k=3) == expected
    assert parse_analysis(text, 5, "multi", "strict", 3) == (expected or [])


STRICT_SINGLE = [
    ('{"failure_step": 2, "feedback": " a "}', [(1, "a")]),
    ('{"failure_step": 4.9, "feedback": "a"}', [(3, "a")]),
    ('{"feedback": "a", "failure_step": 5, "extra": [1, 2]}', [(4, "a")]),
    ('```json\n{"failure_step": 1, "feedback": "a"}\n```', [(0, "a")]),
    ('<think>Maybe {step 3}?</think>{"failure_step": 1, "feedback": "a"}', [(0, "a")]),
    ('{"failure_step": true, "feedback": "a"}', [(0, "a")]),          # True == 1, as in the authors' code
    ('{"failure_step": false, "feedback": "a"}', None),
    ('{"failure_step": 0, "feedback": "a"}', None),
    ('{"failure_step": 6, "feedback": "a"}', None),
    ('{"failure_step": -1, "feedback": "a"}', None),
    ('{"failure_step": "2", "feedback": "a"}', None),
    ('{"failure_step": "Step 2", "feedback": "a"}', None),
    ('{"failure_step": NaN, "feedback": "a"}', None),
    ('{"failure_step": Infinity, "feedback": "a"}', None),
    ('{"failure_step": -Infinity, "feedback": "a"}', None),
    ('{"failure_step": 2, "feedback": ""}', None),
    ('{"failure_step": 2, "feedback": ["a"]}', None),
    ('{"failure_step": 2}', None),
    ('{"step": 2, "feedback": "a"}', None),
    # a Multi answer to the Single parser fails, as do their legacy Multi formats
    ('{"failures": [{"step": 2, "feedback": "a"}]}', None),
    ('{"failure_steps": [2], "feedback": "a"}', None),
    # two objects, a truncated answer
    ('{"failure_step": 2, "feedback": "a"} {"failure_step": 3, "feedback": "b"}', None),
    ('{"failure_step": 2, "feedback": "a', None),
    ('[{"failure_step": 2, "feedback": "a"}]', [(1, "a")]),           # the slice is one whole object
]


@pytest.mark.parametrize("text,expected", STRICT_SINGLE)
def test_parse_strict_single(text, expected):
    assert parse_strict(text, n_steps=5, variant="single", k=3) == expected
    assert parse_analysis(text, 5, "single", "strict") == (expected or [])


def test_parse_strict_k_and_n_steps():
    text = json.dumps({"failures": [{"step": s, "feedback": f"f{s}"} for s in (4, 2, 7)]})
    assert parse_strict(text, 10, "multi", 1) == [(1, "f2")]
    assert parse_strict(text, 10, "multi", 3) == [(1, "f2"), (3, "f4"), (6, "f7")]
    assert parse_strict(text, 10, "multi", 2) == [(1, "f2"), (3, "f4")]
    assert parse_strict(text, 3, "multi", 3) == [(1, "f2")]
    assert parse_strict(text, 0, "multi", 3) is None
    assert parse_analysis(text, 10, "single") == []                 # a Multi answer names no failure_step
    assert parse_analysis(text, 10, "multi", k=3) == [(1, "f2"), (3, "f4"), (6, "f7")]
    # the Single variant keeps one target whatever k is asked
    assert parse_analysis(text, 10, "single", "lenient", k=3) == [(1, "f2")]


def test_parse_strict_keeps_long_feedback_whole():
    """The authors do not cut feedback; only the lenient parser does."""
    text = json.dumps({"failures": [{"step": 1, "feedback": "z" * 5000}]})
    assert parse_strict(text, 1) == [(0, "z" * 5000)]
    assert parse_lenient(text, 1) == [(0, "z" * MAX_FEEDBACK_CHARS)]


@pytest.mark.parametrize("bad", [None, 3, b'{"failure_step": 1, "feedback": "a"}', ["x"], {"failure_step": 1}])
def test_parse_strict_non_string_input(bad):
    for variant in ("multi", "single"):
        assert parse_strict(bad, 3, variant) is None
        for parser in ("strict", "lenient"):
            assert parse_analysis(bad, 3, variant, parser) == []


def test_parse_analysis_dispatch():
    text = '```json\n{"failures": [{"step": "2", "feedback": "a"}]}\n```'
    assert parse_analysis(text, 5) == []                            # strict by default: "2" is not a number
    assert parse_analysis(text, 5, parser="lenient") == parse_lenient(text, 5) == [(1, "a")]
    assert parse_analysis(text, 5, "multi", "strict") == []


def authors_oracle(text, n, variant, k):
    """An independent restatement of the authors' parsers (as described in their code), for differential
    testing; NaN / Infinity steps (which make their int() raise) count as invalid."""
    import re
    text = re.sub(r"<think>.*?</think>\s*", "", text, flags=re.DOTALL)
    text = re.sub(r"^.*?</think>\s*", "", text, flags=re.DOTALL).strip()
    i, j = text.find("{"), text.rfind("}")
    if i < 0 or j <= i:
        return None
    try:
        obj = json.loads(text[i:j + 1])
    except ValueError:
        return None

    def num(v):
        return int(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    if variant == "single":
        s, fb = num(obj.get("failure_step")), obj.get("feedback", "")
        ok = s is not None and isinstance(fb, str) and fb.strip() and 1 <= s <= n
        return [(s - 1, fb.strip())] if ok else None
    pairs = obj.get("failures")
    if not isinstance(pairs, list):
        fb, steps = obj.get("feedback"), obj.get("failure_steps")
        if not isinstance(steps, list) and isinstance(obj.get("failure_step"), (int, float)):
            steps = [obj["failure_step"]]
        if not (isinstance(fb, str) and fb.strip() and isinstance(steps, list)):
            return None
        pairs = [{"step": s, "feedback": fb} for s in steps]
    out = {}
    for e in pairs:
        if isinstance(e, dict) and isinstance(e.get("feedback", ""), str):
            s, fb = num(e.get("step")), e.get("feedback", "").strip()
            if s is not None and 1 <= s <= n and fb and s - 1 not in out:
                out[s - 1] = fb
    return sorted(out.items())[:k] or None

# -----------------------------------------------------------------------------
# parse_lenient: the forgiving parser (the old parse_analysis, 0-based)


CASES = [
    # clean
    ('{"failures": [{"step": 2, "feedback": "%s"}]}' % FB, [(1, FB)]),
    # code fence, with and without the language tag, text around
    ('Here is my analysis:\n```json\n{"failures": [{"step": 1, "feedback": "a"}]}\n```\nHope it helps!', [(0, "a")]),
    ('```\n{"failures": [{"step": 1, "feedback": "a"}]}\n```', [(0, "a")]),
    ('```json\n{"failures": [{"step": 1, "feedback": "a"}]}', [(0, "a")]),              # unclosed fence
    # prose around, no fence
    ('Sure! The answer is {"failures": [{"step": 3, "feedback": "b"}]} -- done.', [(2, "b")]),
    # single object, bare list
    ('{"step": 2, "feedback": "c"}', [(1, "c")]),
    ('[{"step": 2, "feedback": "c"}, {"step": 1, "feedback": "d"}]', [(0, "d"), (1, "c")]),
    # several separate objects in prose
    ('Step A: {"step": 4, "feedback": "x"}\nStep B: {"step": 1, "feedback": "y"}', [(0, "y"), (3, "x")]),
    # numbers as strings / "Step 3" / floats; bools are not numbers
    ('{"failures": [{"step": "3", "feedback": "e"}, {"step": "Step 1", "feedback": "f"}]}', [(0, "f"), (2, "e")]),
    ('{"failures": [{"step": 2.0, "feedback": "e"}, {"step": true, "feedback": "f"}]}', [(1, "e")]),
    ('{"failures": [{"step": "two", "feedback": "e"}, {"step": 2.5, "feedback": "f"}]}', []),
    # alternative keys, capitalised keys, alternative wrapper
    ('{"failures": [{"turn": 2, "hint": "g"}, {"step_id": 3, "correction": "h"}]}', [(1, "g"), (2, "h")]),
    ('{"errors": [{"Step": 1, "Fix": "i"}]}', [(0, "i")]),
    ('{"analysis": {"failures": [{"step": 1, "feedback": "j"}]}}', [(0, "j")]),
    # out of range, duplicates (keep the first), more than k, unsorted
    ('{"failures": [{"step": 0, "feedback": "a"}, {"step": 9, "feedback": "b"}, {"step": -1, "feedback": "c"}]}', []),
    ('{"failures": [{"step": 2, "feedback": "first"}, {"step": 2, "feedback": "second"}]}', [(1, "first")]),
    ('{"failures": [{"step": 5, "feedback": "e"}, {"step": 4, "feedback": "d"}, {"step": 3, "feedback": "c"},'
     ' {"step": 2, "feedback": "b"}, {"step": 1, "feedback": "a"}]}', [(0, "a"), (1, "b"), (2, "c")]),
    # empty / missing / non-string feedback
    ('{"failures": [{"step": 1, "feedback": "   "}, {"step": 2}, {"step": 3, "feedback": 7}]}', []),
    ('{"failures": [{"step": 1, "feedback": ""}, {"step": 1, "feedback": "later"}]}', [(0, "later")]),
    # whitespace is stripped
    ('{"failures": [{"step": 1, "feedback": "  k  "}]}', [(0, "k")]),
    # small repairs: trailing commas, single quotes, Python literals
    ('{"failures": [{"step": 1, "feedback": "a",},],}', [(0, "a")]),
    ("{'failures': [{'step': 2, 'feedback': 'b'}]}", [(1, "b")]),
    ("[{'step': 2, 'feedback': 'b', 'fatal': True}]", [(1, "b")]),
    # truncated answer (generation hit max tokens): keep the complete entries
    ('{"failures": [{"step": 1, "feedback": "a"}, {"step": 3, "feedback": "b"}, {"step": 4, "feed',
     [(0, "a"), (2, "b")]),
    # empty wrapper, garbage, non-JSON
    ('{"failures": []}', []),
    ("", []), ("   \n ", []), ("no json here at all", []), ("{", []), ("}{][", []), ("null", []),
    ("[1, 2, 3]", []), ('"step 2"', []), ("```json\n```", []), ("{step: 2, feedback: x}", []),
    # <think> reasoning is removed first
    ('<think>{"step": 1, "feedback": "no"}</think>{"step": 2, "feedback": "yes"}', [(1, "yes")]),
    # NaN / Infinity steps are never steps
    ('{"failures": [{"step": NaN, "feedback": "a"}, {"step": Infinity, "feedback": "b"}]}', []),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_parse_cases(text, expected):
    assert parse_lenient(text, n_steps=5, k=3) == expected
    assert parse_analysis(text, 5, "multi", "lenient", 3) == expected


def test_parse_k_and_n_steps():
    text = json.dumps({"failures": [{"step": s, "feedback": f"f{s}"} for s in (4, 2, 7)]})
    assert parse_lenient(text, n_steps=5, k=1) == [(1, "f2")]       # Single: the earliest step
    assert parse_lenient(text, n_steps=10, k=3) == [(1, "f2"), (3, "f4"), (6, "f7")]
    assert parse_lenient(text, n_steps=3, k=3) == [(1, "f2")]
    assert parse_lenient(text, n_steps=0, k=3) == []
    assert parse_lenient(text, n_steps=5, k=0) == []


def test_parse_caps_feedback_length():
    text = json.dumps({"step": 1, "feedback": "z" * 5000})
    [(step, fb)] = parse_lenient(text, n_steps=1)
    assert step == 0 and len(fb) == MAX_FEEDBACK_CHARS


@pytest.mark.parametrize("bad", [None, 3, b'{"step": 1, "feedback": "a"}', ["x"], {"step": 1}])
def test_parse_non_string_input(bad):
    assert parse_lenient(bad, n_steps=3) == []


JUNK = [
    "[" * 100_000, "{" * 100_000, '{"a":' * 100_000, "[" * 500 + "]" * 500,
    "x" * 1_000_000, "`" * 1_000_000, "{[" * 500_000, '"' * 1_000_000,
    ('{"step": 1, "feedback": "a"} ' * 40_000),          # 1MB of valid objects
    "[" * 200 + "1, " * 20_000,                          # every start scans far before failing
    '{"failures": ' + "[" * 20_000 + "]" * 20_000 + "}",  # deep but balanced: json.loads recurses
    "{" + "}" * 1_000_000,
    "<think>" * 200_000,                                 # unclosed think tags: the regex rescans (capped input)
    "</think>" * 100_000 + '{"failure_step": 1, "feedback": "a"}',
]


@pytest.mark.parametrize("junk", JUNK)
def test_parse_big_and_deep_junk_is_fast_and_safe(junk):
    for variant in ("multi", "single"):
        for parser in ("strict", "lenient"):
            t0 = time.time()
            out = parse_analysis(junk, 3, variant, parser)
            assert time.time() - t0 < 5.0, (variant, parser)
            assert isinstance(out, list) and len(out) <= 3


PIECES = ['{"failures": [', '{"step": ', '"step": "2"', '1', '3', '"feedback": "You should x"', '}', ']',
          ',', '```json\n', '```', "'", '"', 'Step 2', 'true', 'null', '\n', ' ', '{', '[', ':', '\\',
          '"hint": "h"', '"turn": 4', '\u00e9\u4e2d', '\x00', 'NaN', '1e999', '-0', '99999999999',
          '"failure_step": ', '"failure_steps": [', '<think>', '</think>', 'Infinity', '2.5', 'false']


def fuzz_text(rng):
    """Either a random splice of JSON-ish pieces, or a well-formed answer in a random wrapping."""
    if rng.random() < 0.5:
        return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 30)))
    def step():
        return rng.choice([rng.randint(1, 3)] * 4 + [rng.randint(-1, 8), str(rng.randint(0, 8)),
                                                      rng.randint(0, 8) + 0.5, True])
    entries = [{rng.choice(["step", "turn", "Step"]): step(),
                rng.choice(["feedback", "hint"]): rng.choice(["You should y.", " ", "z" * 600])}
               for _ in range(rng.randint(0, 5))]
    single = {"failure_step": step(), "feedback": rng.choice(["You should y.", " ", 3])}
    legacy = {"failure_steps": [step() for _ in range(rng.randint(0, 4))], "feedback": "You should w."}
    body = json.dumps(rng.choice([{"failures": entries}, entries, entries[0] if entries else {}, single, legacy]))
    return rng.choice(["{}", "```json\n{}\n```", "Answer: {} Thanks.", "{}\n{}", "<think>{}</think>{}",
                       "<think>hm</think>\n{}"]).format(body, body)


def check_targets(out, n, k):
    assert isinstance(out, list) and len(out) <= max(k, 0)
    steps = [s for s, _ in out]
    assert steps == sorted(set(steps))
    for step, fb in out:
        assert type(step) is int and 0 <= step < n
        assert isinstance(fb, str) and fb == fb.strip() and fb


def test_parse_fuzz_never_raises():
    """Random inputs, half of them mutated (sliced, duplicated, spliced) well-formed answers, through both
    parsers; the strict parser also agrees with an independent restatement of the authors' parsers.
    Fixed seed; hypothesis is not installed in the venv."""
    rng = random.Random(0)
    found = {"strict": 0, "lenient": 0}
    for _ in range(3000):
        text = fuzz_text(rng)
        if text and rng.random() < 0.3:                    # drop, duplicate or splice a random slice
            i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
            text = text[:i] + rng.choice([text[i:j] * 2, "", rng.choice(PIECES)]) + text[j:]
        n, k = rng.randint(0, 6), rng.randint(1, 4)
        out = parse_lenient(text, n_steps=n, k=k)
        check_targets(out, n, k)
        assert all(len(fb) <= MAX_FEEDBACK_CHARS for _, fb in out)
        found["lenient"] += bool(out)
        for variant in ("multi", "single"):
            kk = 1 if variant == "single" else k
            strict = parse_strict(text, n, variant, kk)
            assert strict is None or strict                # a failure is None, never []
            assert strict == authors_oracle(text, n, variant, kk), (text, n, variant, kk)
            out = parse_analysis(text, n, variant, "strict", k)
            check_targets(out, n, kk)
            assert out == (strict or [])
            found["strict"] += bool(out)
    assert found["lenient"] > 250 and found["strict"] > 150, found  # the fuzz also reaches the success paths


def test_parse_capped_feedback_has_no_trailing_space():
    text = json.dumps({"step": 1, "feedback": "z" * (MAX_FEEDBACK_CHARS - 1) + " tail"})
    [(_, fb)] = parse_lenient(text, n_steps=1)
    assert fb == fb.strip() and fb.startswith("z")

# -----------------------------------------------------------------------------
# the analyzer input of a real rollout (tiny random Qwen2, real tokenizer, BFCL under the authors' protocol)


@pytest.fixture(scope="module")
def authors_rollout(policy):
    import envs
    import hintsd
    model, tok = policy
    task = envs.load_tasks("bfcl", "train")[0]
    cfg = hintsd.SamplingConfig(max_new_tokens=12, temperature=1.0, max_len=16384)
    env = envs.make_env(task, "json", max_steps=4, protocol="authors")
    docs = env.docs
    [t] = hintsd.rollout(model, tok, [env], cfg, [0])
    return task, docs, t


def test_real_rollout_analyzer_input(authors_rollout):
    import envs
    task, docs, t = authors_rollout
    assert t.status in ("completed", "max_steps") and t.reward == 0.0
    assert 2 <= len(t.steps) <= 4                           # a step without a call ends a turn; 4 turns
    for variant in ("multi", "single"):
        chat_ = analyzer_messages(t, "bfcl", variant)
        assert chat_[0]["content"] == AUTHORS_SYSTEM["bfcl", variant]
        user = chat_[1]["content"]
        assert user.startswith(AUTHORS_USER_HEAD["bfcl", variant]) and user.endswith(AUTHORS_FORMAT[variant])
        # the full system prompt: every tool of the task inside the <tools> block, never clipped
        system = envs.authors_system_prompt(docs).strip()
        assert "Initial task prompt:\nSYSTEM:\n" + system + "\n\nUSER:\n" in user
        tools = user[user.index("\n<tools>\n"):user.index("\n</tools>\n")]
        assert len(docs) > 10
        for d in docs:
            assert json.dumps(d, ensure_ascii=False, separators=(",", ":")) in tools
        query = next(m["content"] for m in task["turns"][0] if m["role"] == "user")
        assert "USER:\n" + query.strip() + "\n\nAttempt trajectory:\nStep 1\n" in user
        # one "Step i" block per step, with its action and output, in order
        assert AUTHORS_CLIP_MARKER not in user
        log = user[user.index("Attempt trajectory:\n"):]
        pos = 0
        for i, s in enumerate(t.steps, 1):
            block = f"Step {i}\nAssistant action:\n{s.text.strip()}\n"
            if format_messages(s.output):
                block += f"Environment output:\n{format_messages(s.output)}\n"
            block += f"Step reward: 0.0\nTerminated: {i == len(t.steps) and t.status == 'completed'}"
            pos = log.index(block, pos) + len(block)
        assert f"\nStep {len(t.steps) + 1}\n" not in log
    # a well-formed answer naming step 2 targets steps[1]
    n = len(t.steps)
    assert parse_analysis('{"failures": [{"step": 2, "feedback": "You should call ls."}]}', n) == \
        [(1, "You should call ls.")]
    assert parse_analysis('{"failure_step": 2, "feedback": "You should call ls."}', n, "single") == \
        [(1, "You should call ls.")]
    # the compact view of the same rollout: numbered steps, no tool schemas
    user = analyzer_messages(t, "bfcl", "multi", "compact")[1]["content"]
    assert f"(1 to {n})" in user and f"Step {n} (assistant)" in user and "<tools>" not in user
