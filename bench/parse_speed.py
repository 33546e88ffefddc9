"""Parse time of envs.parse_calls on hostile assistant texts (10 kB, 100 kB, 1 MB): a check that parsing stays
(near) linear in the text's length.

    .venv/bin/python bench/parse_speed.py [--sizes 10000 100000 1000000]

Columns: the friendly json and python formats (texts over envs.MAX_ACTION_CHARS are refused before parsing, so
their large rows time that check), the same two with the limit lifted (the parsers themselves), and the authors'
protocol (no limit). Prints a markdown table of seconds (one run each) and, per cell, the outcome: err (an error),
none (no call), or the number of calls.

A second table times the analyzer-answer parsers of prompts.py on hostile answers of the largest size:
parse_analysis with each parser, parse_judgement, and _as_step on 49,000 spaces + "a" (a string its regex would
backtrack on). Outcome: the number of targets, or the value returned.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
import prompts  # noqa: E402

VALID = '<tool_call>{"name": "ls", "arguments": {}}</tool_call>\n'


def repeat(unit, n, head="", tail=""):
    """head + unit repeated up to n characters in all + tail."""
    return head + unit * max(1, (n - len(head) - len(tail)) // len(unit)) + tail


# name -> text of about n characters
HOSTILE = {
    '"{" * n': lambda n: repeat("{", n),
    '"[" * n': lambda n: repeat("[", n),
    '"[" * n/2 + "]" * n/2': lambda n: "[" * (n // 2) + "]" * (n // 2),
    "spaces": lambda n: repeat(" ", n),
    '"{" + spaces + "name"': lambda n: repeat(" ", n, "{", '"name"'),
    '"<tool_call>" * k': lambda n: repeat("<tool_call>", n),
    '"<tool_call>{" * k': lambda n: repeat("<tool_call>{", n),
    '"<tool_call>{}" * k': lambda n: repeat("<tool_call>{}", n),
    '"<tool_call>{}</tool_call>" * k': lambda n: repeat("<tool_call>{}</tool_call>", n),
    '"<tool_call>{" * k + "}</tool_call>"': lambda n: repeat("<tool_call>{", n, "", "}</tool_call>"),
    "<tool_call> + deep JSON": lambda n: repeat("[", n, '<tool_call>{"name": "ls", "arguments": ', "}</tool_call>"),
    "valid <tool_call> blocks": lambda n: repeat(VALID, n),
    '"[f(x=1)] " * k': lambda n: repeat("[f(x=1)] ", n),
    '"[cd(folder=" + "]" * n': lambda n: repeat("]", n, "[cd(folder="),
    "[cd(folder=' unclosed": lambda n: repeat("x", n, "[cd(folder='"),
    '\'"\' * n in a call': lambda n: repeat('"', n, "[cd(folder="),
    "\"'''\\\\\" * k in a call": lambda n: repeat("'''\\", n, "[cd(folder="),
    '"[f(" * k': lambda n: repeat("[f(", n),
}
COLUMNS = (("json", "json", "friendly", True), ("python", "python", "friendly", True),
           ("json, no limit", "json", "friendly", False), ("python, no limit", "python", "friendly", False),
           ("authors", "json", "authors", True))


def timed(text, action_format, protocol, limited):
    """(seconds, outcome) of one parse_calls; the friendly length limit lifted when not limited."""
    saved = envs.MAX_ACTION_CHARS
    envs.MAX_ACTION_CHARS = saved if limited else float("inf")
    try:
        t0 = time.perf_counter()
        calls, error = envs.parse_calls(text, action_format, protocol)
        seconds = time.perf_counter() - t0
    finally:
        envs.MAX_ACTION_CHARS = saved
    return seconds, "err" if error else (str(len(calls)) if calls else "none")


# analyzer answers: name -> text of about n characters
ANSWERS = {
    '"{" * n': lambda n: repeat("{", n),
    '"[" * n': lambda n: repeat("[", n),
    '"```" * k': lambda n: repeat("```", n),
    '"<think>" * k (unclosed)': lambda n: repeat("<think>", n),
    '"</think>" * k': lambda n: repeat("</think>", n),
    '"</think>" + "<think>" * k': lambda n: repeat("<think>", n, "</think>"),
    '\'{"step": 1, \' * k': lambda n: repeat('{"step": 1, ', n),
    '\'{"step": "\' + spaces': lambda n: repeat(" ", n, '{"step": "'),
    '\'{"a":\' * k': lambda n: repeat('{"a":', n),
}


def analyzer_rows(n):
    """[(function, input, chars, seconds, outcome)]: _as_step on 49k spaces + "a", then parse_analysis (both
    parsers) and parse_judgement on each hostile answer of about n characters."""
    def timed_call(fn, text):
        t0 = time.perf_counter()
        value = fn(text)
        return time.perf_counter() - t0, value
    rows = []
    text = " " * 49_000 + "a"
    seconds, value = timed_call(prompts._as_step, text)
    rows.append(("prompts._as_step", '" " * 49,000 + "a"', len(text), seconds, repr(value)))
    for name, make in ANSWERS.items():
        text = make(n)
        for parser in ("strict", "lenient"):
            seconds, value = timed_call(lambda t, p=parser: prompts.parse_analysis(t, 20, "multi", p), text)
            rows.append((f"parse_analysis, {parser}", name, len(text), seconds, str(len(value))))
        seconds, value = timed_call(prompts.parse_judgement, text)
        rows.append(("parse_judgement", name, len(text), seconds, repr(value)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    a = ap.parse_args()
    print("| input | chars | " + " | ".join(c[0] + " (s)" for c in COLUMNS) + " |")
    print("|---|---:|" + "---:|" * len(COLUMNS))
    worst = 0.0
    for name, make in HOSTILE.items():
        for n in a.sizes:
            text = make(n)
            cells = [timed(text, fmt, protocol, limited) for _, fmt, protocol, limited in COLUMNS]
            worst = max(worst, *(s for s, _ in cells))
            print(f"| `{name}` | {len(text):,} | " + " | ".join(f"{s:.5f} ({o})" for s, o in cells) + " |")
    print(f"\nslowest cell: {worst:.3f} s (MAX_ACTION_CHARS = {envs.MAX_ACTION_CHARS:,})")
    print("\n| analyzer parser | input | chars | seconds | outcome |")
    print("|---|---|---:|---:|---|")
    for fn, name, chars, seconds, outcome in analyzer_rows(max(a.sizes)):
        print(f"| {fn} | `{name}` | {chars:,} | {seconds:.5f} | {outcome} |")
    print(f"\n(prompts.MAX_PARSE_CHARS = {prompts.MAX_PARSE_CHARS:,}: the parsers read only the start of an answer)")


if __name__ == "__main__":
    main()
