"""Tool-use environments for HINT-SD: BFCL v3 multi-turn (base + long_context); AppWorld in the section at the end.

    tasks = load_tasks("bfcl", "train")          # list of task dicts, paper split 200/40/160 (turns=K: first K turns)
    env = make_env(tasks[0], action_format="json", protocol="friendly")
    msgs = env.reset()                           # first chat messages; env.tools goes to the chat template
    while not env.done:
        msgs = env.step(assistant_text)          # tool results, or the next user turn, or [] when done
    r = env.reward()                             # 1.0 / 0.0 from the official BFCL multi-turn checker

Two action protocols (ACTION_PROTOCOLS); both score with the same official checker and step cap.
  friendly (default): env.tools holds the JSON-schema tools (excluded functions removed) for the chat template's
    tools=, our own short system prompt. A step whose text holds at least one call executes the calls and returns
    one tool message per call (errors included, as "Error: ..."); a malformed call gets an error tool message
    and the turn stays open; a step without any call attempt ends the user turn. Two action formats:
      json:   <tool_call>{"name": "cd", "arguments": {"folder": "docs"}}</tool_call>  (one block per call;
              a reply that is only bare JSON call objects, as small models often write, counts too)
      python: [cd(folder="docs"), ls(a=True)]                                      (keyword literals only)
  authors: the environment of the paper's code (wgcyeo/HINT-SD, env/service/environments/bfcl). env.tools is [];
    the system prompt lists the raw BFCL docs of ALL functions of the involved classes (excluded ones included)
    in <tools></tools>, the first user turn follows. Only <tool_call>{...}</tool_call> blocks with "name" and
    "arguments" count; other blocks are skipped silently, and a reply without any such block ends the user turn
    (no error message), also at the step cap (the next query is still returned). Every counted block runs, as
    their executor runs the string name(k=repr(v), ...): "arguments" that are not an object (or a JSON string of
    one) mean no arguments, and the text a reply reads back is bfcl's: str() of a result that is not a str or a
    dict, "Error during execution: " + the exception's text. All results of a reply come back as ONE user message
    of <tool_call> blocks {"name": "<function>_<k>", "content": <result>}. The end of the conversation is the user
    message "[CONVERSATION_COMPLETED]". The reward is the checker's only for a completed conversation in which
    every user turn made a call (their _extract_multi_turn_responses drops turns without one), else 0. json only.

max_steps caps the assistant steps of the whole episode (official BFCL caps 20 steps per user turn). As in
the official runner, an episode stopped before its last user turn gets reward 0.

Safety: model text is never eval'd. Calls are parsed with json / ast.literal_eval, dispatched by name to
the backend instance, and the official checker (which eval()s call strings) only sees strings that we
render ourselves from validated calls. Under the authors' protocol a name that is not a method of the task's
classes runs nothing (their eval() would reach Python's builtins and bfcl's module globals). Parsing is linear in
the text's length; friendly replies over MAX_ACTION_CHARS characters are refused with an error before any parsing.
"""
import ast
import bisect
import builtins
import copy
import functools
import importlib
import inspect
import json
import keyword
import math
import random
import re
import uuid
import warnings
from pathlib import Path

import bfcl_eval
from bfcl_eval.constants.executable_backend_config import (
    CLASS_FILE_PATH_MAPPING, MULTI_TURN_FUNC_DOC_FILE_MAPPING, STATELESS_CLASSES)
from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils
from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker

BENCHES = ("bfcl", "appworld")  # appworld: see the AppWorld section at the end
SPLITS = ("train", "eval", "test", "all")
ACTION_FORMATS = ("json", "python")
ACTION_PROTOCOLS = ("authors", "friendly")  # see the module docstring
MAX_ACTION_CHARS = 20_000  # friendly protocol: longer replies are refused unparsed (a real call list is far shorter)
CONVERSATION_COMPLETED = "[CONVERSATION_COMPLETED]"  # the authors' env: final message of a finished conversation

BFCL_DATA = Path(bfcl_eval.__file__).parent / "data"
BFCL_CATEGORIES = ("multi_turn_base", "multi_turn_long_context")
SPLIT_SEED = 42
SPLIT_FRACTIONS = {"train": (0.0, 0.5), "eval": (0.5, 0.6), "test": (0.6, 1.0)}
NO_CALL_TEXT = "No function call is needed for this request."  # ground-truth action of an empty turn
# BFCL doc types -> JSON-schema types (unknown types fall back to "string", as "any" does)
SCHEMA_TYPES = {"dict": "object", "object": "object", "float": "number", "double": "number", "number": "number",
                "integer": "integer", "int": "integer", "long": "integer", "string": "string", "str": "string",
                "char": "string", "any": "string", "boolean": "boolean", "bool": "boolean", "array": "array",
                "list": "array", "tuple": "array", "null": "null"}
# numeric arguments that make a backend hang (huge int powers, mpmath / decimal precision): capped
ARG_LIMITS = {("power", "exponent"): 1000, ("logarithm", "precision"): 1000, ("square_root", "precision"): 1000}
# names bfcl's executor refuses before its eval() (execute_multi_turn_func_call), as the authors' env runs it
AUTHORS_REFUSED = ("kill", "exit", "quit", "remove", "unlink", "popen", "Popen", "run")
SYSTEM_JSON = ("You are an agent that completes the user's requests by calling the provided functions. "
               "You may call functions over several steps and will see their results. When the request "
               "is done, or cannot be done with the functions, answer in plain text without a call.")
SYSTEM_PYTHON = (SYSTEM_JSON + "\n\nTo call functions, answer with only a Python list of calls with keyword "
                 "arguments, e.g. [func_a(x=1), func_b(name=\"y\")]. Otherwise answer in plain text.\n"
                 "The available functions (JSON):\n{docs}")
# the authors' system prompt (their tools_schema_to_qwen_prompt), typo "<tool_call> and <tool_call>" included
AUTHORS_HEAD = ("\n\n# Tools\n", "You may call one or more functions to assist with the user query.\n",
                "You are provided with function signatures within <tools></tools> XML tags:", "<tools>")
AUTHORS_TAIL = ("</tools>\n",
                "Important: Always use only the latest tool list provided, ignoring any functions mentioned in "
                "previous messages.",
                "For each function call, return a json object with function name and arguments within <tool_call> "
                "and <tool_call> XML tags:",
                "<tool_call>", '{"name": <function-name>, "arguments": <args-json-object>}', "</tool_call>")

# -----------------------------------------------------------------------------
# tasks


def _read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def _load_bfcl():
    tasks = []
    for cat in BFCL_CATEGORIES:
        questions = _read_jsonl(BFCL_DATA / f"BFCL_v4_{cat}.json")
        answer_file = BFCL_DATA / "possible_answer" / f"BFCL_v4_{cat}.json"
        answers = {a["id"]: a["ground_truth"] for a in _read_jsonl(answer_file)}
        for q in questions:
            tasks.append({"id": q["id"], "category": cat, "turns": q["question"],
                          "initial_config": q["initial_config"], "involved_classes": q["involved_classes"],
                          "excluded_function": q.get("excluded_function", []),
                          "ground_truth": answers[q["id"]], "long_context": cat == "multi_turn_long_context"})
    return tasks


def cut_turns(task, k):
    """The task limited to its first k user turns and their ground truth (same id, "turns_kept": k added);
    a task with at most k turns is returned whole."""
    if len(task["turns"]) <= k:
        return task
    return {**task, "turns": task["turns"][:k], "ground_truth": task["ground_truth"][:k], "turns_kept": k}


def load_tasks(bench, split, turns=None, ids=None):
    """Tasks of a split. turns=K (BFCL only): every task cut to its first K user turns (see cut_turns); the
    split is drawn from the whole tasks first, so it does not depend on K. ids: only these tasks, in this order
    (ValueError naming any id not in the split, or given twice: it would count twice in Avg@k and in training)."""
    tasks = _split_tasks(bench, split, turns)
    if ids:
        twice = sorted({i for i in ids if list(ids).count(i) > 1})
        if twice:
            raise ValueError(f"--tasks: each id once; given more than once: {twice}")
        by_id = {t["id"]: t for t in tasks}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise ValueError(f"--tasks: not in the {bench} {split} split: {unknown}")
        tasks = [by_id[i] for i in ids]
    return tasks


def _split_tasks(bench, split, turns):
    if bench not in BENCHES:
        raise ValueError(f"unknown bench {bench!r}; allowed: {BENCHES}")
    if turns is not None and bench != "bfcl":
        raise ValueError("--turns applies to BFCL only")
    if turns is not None and (isinstance(turns, bool) or not isinstance(turns, int) or turns < 1):
        raise ValueError(f"turns must be an int >= 1 (or None for whole tasks), got {turns!r}")
    if bench == "appworld":
        return load_appworld_tasks(split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {SPLITS}")
    tasks = _load_bfcl()
    random.Random(SPLIT_SEED).shuffle(tasks)
    if split != "all":
        lo, hi = SPLIT_FRACTIONS[split]
        tasks = tasks[round(lo * len(tasks)):round(hi * len(tasks))]
    return tasks if turns is None else [cut_turns(t, turns) for t in tasks]


# -----------------------------------------------------------------------------
# tool schemas


def to_json_schema(schema):
    """BFCL parameter doc -> valid JSON schema (recursive over properties / items)."""
    out = dict(schema)
    if isinstance(out.get("type"), str):
        out["type"] = SCHEMA_TYPES.get(out["type"], "string")
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: to_json_schema(v) for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = to_json_schema(out["items"])
    return out


@functools.lru_cache(maxsize=None)
def _class_tools(cls):
    docs = _read_jsonl(BFCL_DATA / "multi_turn_func_doc" / MULTI_TURN_FUNC_DOC_FILE_MAPPING[cls])
    return tuple({"type": "function", "function": {"name": d["name"], "description": d["description"],
                                                   "parameters": to_json_schema(d["parameters"])}} for d in docs)


def bfcl_tools(involved_classes, excluded=()):
    """OpenAI-style tool schemas of all functions of the classes, minus the excluded ones (fresh copies)."""
    return [copy.deepcopy(t) for c in involved_classes for t in _class_tools(c)
            if t["function"]["name"] not in excluded]


def bfcl_task_tools(task, protocol="friendly"):
    """The schemas of the functions a task's environment runs: every function of its classes under the authors'
    protocol (their system prompt lists them all), the task's excluded functions removed otherwise."""
    excluded = () if protocol == "authors" else task.get("excluded_function") or ()
    return bfcl_tools(task["involved_classes"], excluded)


def bfcl_tool_names(task, protocol="friendly") -> list[str]:
    """The names of the functions the task's environment runs, in the order they are listed to the policy."""
    return [t["function"]["name"] for t in bfcl_task_tools(task, protocol)]


@functools.lru_cache(maxsize=None)
def _class_docs(cls):
    return tuple(_read_jsonl(BFCL_DATA / "multi_turn_func_doc" / MULTI_TURN_FUNC_DOC_FILE_MAPPING[cls]))


def bfcl_docs(involved_classes):
    """The raw BFCL docs of ALL functions of the classes, in class then file order (fresh copies): what
    bfcl_eval's populate_test_cases_with_predefined_functions gives a task, excluded_function ignored."""
    return [copy.deepcopy(d) for c in involved_classes for d in _class_docs(c)]


def authors_system_prompt(docs):
    """The authors' system message: their tool prompt over the raw docs, compact JSON one per line."""
    tools = [json.dumps(d, ensure_ascii=False, separators=(",", ":")) for d in docs]
    return "\n".join([*AUTHORS_HEAD, *tools, *AUTHORS_TAIL])


# -----------------------------------------------------------------------------
# parsing and rendering calls


def is_plain(v):
    """JSON-like literal: the only argument values we execute or render for the checker."""
    if isinstance(v, float):
        return math.isfinite(v)  # repr(nan) / repr(inf) would not even evaluate
    if isinstance(v, list):
        return all(is_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and is_plain(x) for k, x in v.items())
    return v is None or isinstance(v, (bool, int, str))


def _check_call(name, args):
    if not isinstance(name, str) or not name.isidentifier():
        return f"invalid function name {name!r}"
    if not isinstance(args, dict):
        return f"arguments of {name} must be an object"
    for k, v in args.items():
        if not isinstance(k, str) or not k.isidentifier() or keyword.iskeyword(k):
            return f"invalid argument name {k!r} for {name}"
        if not is_plain(v):
            return f"argument {k!r} of {name} must be a plain literal (string, number, bool, null, list, dict)"
    return None


def _call_from_obj(obj):
    """A call object -> (name, args). No "arguments" (or "parameters") key means no arguments, unless the object
    has another key: then the arguments may be under a misspelt key (' arguments', 'args'), which would otherwise be
    dropped silently and the call run without them."""
    if not isinstance(obj, dict) or "name" not in obj:
        raise ValueError('expected {"name": ..., "arguments": {...}}')
    other = sorted(set(obj) - {"name", "arguments", "parameters"})
    if other and "arguments" not in obj and "parameters" not in obj:
        raise ValueError(f'no "arguments" key, and unknown keys {other}: '
                         'expected {"name": ..., "arguments": {...}}')
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    return obj["name"], args


def _parse_json_block(block):
    block = block.strip()
    try:
        obj = json.loads(block)
    except json.JSONDecodeError:
        i, j = block.find("{"), block.rfind("}")  # tolerate code fences or chatter around the object
        obj = json.loads(block[i:j + 1]) if 0 <= i < j else json.loads(block)
    return _call_from_obj(obj)


FENCE_OPEN = re.compile(r"```[a-z]*\s*")
JSON_GAP = re.compile(r"[ \t\r\n,]*")  # what may stand between bare JSON call objects


def _bare_json_objects(text):
    """Small models often drop the <tool_call> tags. A reply that is nothing but JSON call objects
    (optionally in a code fence, one after another or as a list) still counts as calls; None otherwise."""
    body = text.strip()
    # strip a code fence (anchored at both ends: no regex scan over the whole body, so linear)
    if body.startswith("```"):
        body = body[FENCE_OPEN.match(body).end():]
    if body.endswith("```"):
        body = body[:-3].rstrip()
    if not body.startswith(("{", "[")) or '"name"' not in body:
        return None
    dec, objs, i = json.JSONDecoder(), [], 0
    while i < len(body):
        obj, i = dec.raw_decode(body, i)
        objs += obj if isinstance(obj, list) else [obj]
        i = JSON_GAP.match(body, i).end()
    return objs


def _check_calls(calls):
    for name, args in calls:
        if err := _check_call(name, args):
            return [], err
    return calls, None


def _parse_json(text):
    if "<tool_call>" not in text:
        try:
            objs = _bare_json_objects(text)
            return ([], None) if objs is None else _check_calls([_call_from_obj(o) for o in objs])
        except (ValueError, TypeError, RecursionError) as e:
            return [], f"could not parse the call {text.strip()[:200]!r}: {e}"
    blocks = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.DOTALL)
    calls = []
    for block in blocks:
        try:
            calls.append(_parse_json_block(block))
        except (ValueError, TypeError, RecursionError) as e:  # JSONDecodeError is a ValueError
            return [], f"could not parse tool call {block.strip()[:200]!r}: {e}"
    return _check_calls(calls)


def _calls_from_ast(node, allow_positional=False):
    """ast list of calls -> [(name, args)] with literal values; positional args (trusted ground truth
    only) get int keys 0, 1, ..."""
    if not isinstance(node, ast.List):
        raise ValueError("expected a list of function calls like [f(a=1)]")
    calls = []
    for el in node.elts:
        if not (isinstance(el, ast.Call) and isinstance(el.func, ast.Name)):
            raise ValueError(f"not a plain function call: {ast.unparse(el)[:100]}")
        if el.args and not allow_positional:
            raise ValueError(f"use keyword arguments only in {el.func.id}(...)")
        args = dict(enumerate(el.args))
        for kw in el.keywords:
            if kw.arg is None:
                raise ValueError(f"**kwargs is not allowed in {el.func.id}(...)")
            args[kw.arg] = kw.value
        try:
            args = {k: ast.literal_eval(v) for k, v in args.items()}
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(f"arguments of {el.func.id} must be literals")
        calls.append((el.func.id, args))
    return calls


CALL_LIST_START = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")
PY_STOPS = re.compile(r"[\[\](){}'\"#]")  # what the bracket scan of a Python call list looks at
# inside a string literal: an escape, the closing quote, or (one-line strings) a newline, which leaves it unclosed
PY_STRING_STOPS = {q: re.compile(r"\\|" + q + ("" if len(q) == 3 else r"|\n")) for q in ("'", '"', "'''", '"""')}


def _string_end(src, i, quote):
    """Index just past the string literal whose body starts at src[i]; None when it is never closed."""
    stops = PY_STRING_STOPS[quote]
    while m := stops.search(src, i):
        if m.group() != "\\":
            return m.end() if m.group() == quote else None
        i = m.end() + 1  # an escape hides the next character (a quote, a backslash, a newline)
    return None


def _list_end(src):
    """Index just past the bracket that closes the one at src[0], found by one left-to-right scan that counts
    bracket depth and skips string literals and comments (linear time); None when it is never closed."""
    depth, i = 0, 0
    while m := PY_STOPS.search(src, i):
        c, i = m.group(), m.end()
        if c == "#":
            i = src.find("\n", i)
            if i < 0:
                return None
        elif c in "'\"":
            quote = c * 3 if src.startswith(c * 3, m.start()) else c
            i = _string_end(src, m.start() + len(quote), quote)
            if i is None:
                return None
        else:
            depth += 1 if c in "[({" else -1
            if depth == 0:
                return i
    return None


def _parse_python(text):
    stripped = text.strip()
    m = CALL_LIST_START.search(text)
    if m is None and not stripped.startswith("["):
        return [], None
    src = text[m.start():] if m else stripped
    end = _list_end(src)
    if end is None:
        return [], "could not parse the call list: unbalanced brackets"
    try:
        node = ast.parse(src[:end], mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        return [], f"could not parse the call list: {e}"
    try:
        return _check_calls(_calls_from_ast(node))
    except ValueError as e:
        return [], str(e)


# The authors' parser is re.finditer(r"<tool_call>\s*\n?({.*?})\s*\n?\</tool_call>", text, re.DOTALL), which is
# quadratic on hostile text (e.g. "<tool_call>{" repeated). _authors_blocks finds the same groups in linear time.
AUTHORS_CALL = re.compile(r"<tool_call>\s*\n?({.*?})\s*\n?\</tool_call>", re.DOTALL)  # reference only (tests)
AUTHORS_OPEN = re.compile(r"<tool_call>\s*\{")
AUTHORS_CLOSE = re.compile(r"\}\s*</tool_call>")


def _authors_blocks(text):
    """The group(1) texts of AUTHORS_CALL.finditer(text), in order, found in linear time."""
    # every "}" that the pattern's tail accepts; such matches never overlap, so finditer sees all of them
    closes = list(AUTHORS_CLOSE.finditer(text))
    starts = [m.start() for m in closes]
    blocks, pos = [], 0
    for m in AUTHORS_OPEN.finditer(text):
        if m.start() < pos:  # a tag inside the previous match: finditer resumes after that match
            continue
        k = bisect.bisect_left(starts, m.end())  # the lazy {.*?}: the first accepted "}" after the "{"
        if k == len(starts):  # no "}" closes this block, so none closes a later one either
            break
        blocks.append(text[m.end() - 1:starts[k] + 1])
        pos = closes[k].end()
    return blocks


def authors_arguments(arguments):
    """What the authors' _convert_tool_calls_to_execution_format makes of "arguments": a string is JSON-decoded,
    and whatever is then not an object (or did not decode) means no arguments: they run name()."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return {}
    return arguments if isinstance(arguments, dict) else {}


def _authors_call(block):
    """One matched block -> (name, arguments as authors_arguments gives them), or None where the authors' parser
    skips it (invalid JSON, not a dict, no "name" or "arguments"). The name may be any JSON value."""
    try:
        obj = json.loads(block)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None
    if not isinstance(obj, dict) or "name" not in obj or "arguments" not in obj:
        return None
    return obj["name"], authors_arguments(obj["arguments"])


def _parse_authors(text):
    calls = [_authors_call(b) for b in _authors_blocks(text)]
    return [c for c in calls if c is not None], None


def _check_protocol(action_format, protocol):
    if action_format not in ACTION_FORMATS:
        raise ValueError(f"unknown action format {action_format!r}; allowed: {ACTION_FORMATS}")
    if protocol not in ACTION_PROTOCOLS:
        raise ValueError(f"unknown action protocol {protocol!r}; allowed: {ACTION_PROTOCOLS}")
    if protocol == "authors" and action_format != "json":
        raise ValueError(f'the "authors" protocol takes <tool_call> JSON only: action_format must be "json", '
                         f'not {action_format!r}')


def parse_calls(text, action_format, protocol="friendly"):
    """Assistant text -> (calls, error). calls: [(name, kwargs)]. friendly: all or nothing: if any call is
    malformed, calls is [] and error says why; ([], None) means the text makes no call attempt. authors: the
    calls of the <tool_call> blocks with "name" and "arguments", the others skipped silently; names and argument
    keys unchecked (BFCLEnv runs them as the authors do, safely); error is always None."""
    _check_protocol(action_format, protocol)
    if protocol == "authors":
        return _parse_authors(text)
    if len(text) > MAX_ACTION_CHARS:
        return [], (f"the reply is {len(text)} characters long, over the limit of {MAX_ACTION_CHARS}; "
                    "a call list is much shorter")
    try:
        return _parse_json(text) if action_format == "json" else _parse_python(text)
    except Exception as e:  # e.g. RecursionError on absurdly nested input: never crash the episode
        return [], f"could not parse the calls: {type(e).__name__}: {e}"


def call_to_str(name, args):
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


def format_calls(calls, action_format):
    """[(name, kwargs)] -> assistant text in the given action format ('' for no calls)."""
    if not calls:
        return ""
    if action_format == "json":
        return "\n".join("<tool_call>\n" + json.dumps({"name": n, "arguments": a}, ensure_ascii=False)
                         + "\n</tool_call>" for n, a in calls)
    if action_format == "python":
        return "[" + ", ".join(call_to_str(n, a) for n, a in calls) + "]"
    raise ValueError(f"unknown action format {action_format!r}; allowed: {ACTION_FORMATS}")


# -----------------------------------------------------------------------------
# environment


def make_env(task, action_format="json", max_steps=None, protocol="friendly"):
    """max_steps None: the bench's default (BFCL 20, AppWorld 40). AppWorld ignores action_format (code) and
    protocol."""
    if protocol not in ACTION_PROTOCOLS:
        raise ValueError(f"unknown action protocol {protocol!r}; allowed: {ACTION_PROTOCOLS}")
    if task.get("bench") == "appworld":
        return AppWorldEnv(task, APPWORLD_MAX_STEPS if max_steps is None else max_steps)
    return BFCLEnv(task, action_format, 20 if max_steps is None else max_steps, protocol)


def _backend_class(name):
    return getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[name]), name)


def _user_content(messages):
    """The content of a turn's first user message, as the authors' env sends it ("" if it has none)."""
    return next((m["content"] for m in messages if m["role"] == "user"), "")


def _authors_content(result):
    """A result as the authors' env shows it: parsed JSON when it looks like JSON and parses, else the text."""
    if result.strip().startswith(("{", "[")):
        try:
            return json.loads(result)
        except (ValueError, RecursionError):
            pass
    return result


def authors_results_text(results):
    """[(call_id, result text)] -> the content of the one user message that carries them in the authors' env."""
    blocks = ["<tool_call>\n" + json.dumps({"name": cid, "content": _authors_content(r)}, ensure_ascii=False)
              + "\n</tool_call>" for cid, r in results]
    return "\n".join(blocks) + "\n"


def _over_limit(name, args):
    """Why a call must not run (a numeric argument over ARG_LIMITS, which would hang the backend), or None."""
    for k, v in args.items():
        limit = ARG_LIMITS.get((name, k))
        if limit is not None and isinstance(v, (int, float)) and abs(v) > limit:
            return f"argument {k!r} of {name} must be at most {limit} in magnitude."
    return None


def _nonfinite(values):
    """'inf' or 'nan' for the first non-finite float among the values (depth first, in order), else None."""
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            return repr(abs(v))
        inner = v if isinstance(v, list) else v.values() if isinstance(v, dict) else ()
        if bad := _nonfinite(inner):
            return bad
    return None


def authors_result(result):
    """A backend result as bfcl's executor returns it to the authors' env: a str as is, a dict as json.dumps (its
    str() if that fails), anything else as str() (a list reads ['a', 'b'], None reads None)."""
    if type(result) is str:
        return result
    if type(result) is dict:
        try:
            return json.dumps(result)
        except (TypeError, ValueError, RecursionError):
            return str(result)
    return str(result)


def _decoded(v, nested):
    """An argument value after bfcl's decode_execute (ast_parse, then parse_nested_value), which the authors' checker
    runs on their call string: inf / nan come back as the strings 'inf' / 'nan', -inf does not decode; a dict met
    through dicts from the top (not inside a list) whose values are all dicts (or none) reads as a function call,
    and one with a key that needs escaping is rendered unescaped. ValueError for those: the checker skips them."""
    if isinstance(v, float) and not math.isfinite(v):
        if v < 0:
            raise ValueError("-inf does not decode")
        return repr(v)
    if isinstance(v, list):
        return [_decoded(x, False) for x in v]
    if isinstance(v, dict):
        out = {k: _decoded(x, nested) for k, x in v.items()}
        if nested and (all(isinstance(x, dict) for x in out.values()) or any(repr(k) != f"'{k}'" for k in out)):
            raise ValueError("decodes to another call")
        return out
    return v


def authors_checker_args(args):
    """The arguments of a call as the authors' checker receives them (see _decoded), or None when it skips it."""
    try:
        return {k: _decoded(v, True) for k, v in args.items()}
    except (ValueError, RecursionError):
        return None


class BFCLEnv:
    """One BFCL multi-turn task with live backend instances. Construction already resets it."""

    def __init__(self, task, action_format="json", max_steps=20, protocol="friendly"):
        _check_protocol(action_format, protocol)
        self.task, self.action_format, self.max_steps, self.protocol = task, action_format, max_steps, protocol
        # the authors' protocol lists every function of the classes, raw, in the system prompt
        self.docs = bfcl_docs(task["involved_classes"]) if protocol == "authors" else None
        self.schemas = bfcl_task_tools(task, protocol)
        self.tool_names = {t["function"]["name"] for t in self.schemas}
        # what the chat template gets as tools=: the schemas in the friendly json format; none in the python
        # format, whose system prompt lists the docs itself (the template's <tool_call> instructions would
        # contradict it), nor under the authors' protocol, whose system prompt holds its own tool list
        self.tools = self.schemas if protocol == "friendly" and action_format == "json" else []
        self.reset()

    def reset(self):
        self.turn, self.steps, self.done, self.completed = 0, 0, False, False  # completed: every turn finished
        self.calls = [[]]  # per turn, per step: checker strings of the executed calls
        self.methods = {}  # function name -> bound method of a backend instance (tools only)
        for cls_name in self.task["involved_classes"]:
            inst = _backend_class(cls_name)()
            if cls_name not in STATELESS_CLASSES:
                config = copy.deepcopy(self.task["initial_config"].get(cls_name, {}))
                inst._load_scenario(config, long_context=self.task["long_context"])
            for name, method in inspect.getmembers(inst, inspect.ismethod):
                if name in self.tool_names:
                    self.methods[name] = method
        if self.protocol == "authors":
            return [{"role": "system", "content": authors_system_prompt(self.docs)},
                    {"role": "user", "content": _user_content(self.task["turns"][0])}]
        first = [dict(m) for m in self.task["turns"][0]]
        if self.action_format == "json":
            return [{"role": "system", "content": SYSTEM_JSON}] + first
        docs = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in self.schemas)
        return [{"role": "system", "content": SYSTEM_PYTHON.format(docs=docs)}] + first

    def execute(self, name, args):
        """Run one parsed call on the backend (friendly protocol); returns (result text, whether it ran)."""
        if name not in self.methods:
            return f"Error: unknown function {name!r}.", False
        method = self.methods[name]
        try:
            inspect.signature(method).bind(**args)
        except TypeError as e:
            return f"Error: bad arguments for {name}: {e}", False
        if msg := _over_limit(name, args):
            return f"Error: {msg}", False
        try:
            result = method(**args)
            return (result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)), True
        except Exception as e:  # it ran: state may have changed
            return f"Error: {name} raised {type(e).__name__}: {e}", True

    def execute_authors(self, name, args):
        """One call as the authors' env runs it: bfcl's executor eval()s their string name(k=repr(v), ...). Here
        that string is only parsed, and only a method of the task's classes is called, with the JSON values.
        Returns (result text, the call string for the checker or None when the checker must not see it)."""
        text = call_to_str(name, args)
        head = text.split("(")[0]
        head = head.split(".")[1] if "." in head else head
        # the executor refuses these names before its eval(), in the env and in the checker alike
        refused = f"Error during execution: Function call {head} is not allowed." if head in AUTHORS_REFUSED else None
        try:
            with warnings.catch_warnings():  # e.g. "'NoneType' object is not callable; perhaps you missed a comma?"
                warnings.simplefilter("ignore")
                compile(text, "<string>", "eval")  # compiled, never run: eval()'s SyntaxError, if any
                node = ast.parse(text, mode="eval").body
        except (SyntaxError, ValueError, MemoryError, RecursionError) as e:  # their checker cannot decode it either
            return refused or f"Error during execution: {e}", None
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            return refused or f"Error during execution: name {head!r} is not defined", None
        fid, kwargs = node.func.id, dict(zip((kw.arg for kw in node.keywords), args.values()))  # names as eval sees
        method = self.methods.get(name) if fid == name else None  # bfcl prefixes only ASCII names of methods
        checked = authors_checker_args(kwargs)
        # the checker may replay a method, a refused name or an unknown one (a NameError there); never a Python
        # builtin or a global of bfcl's module, which its eval() would run
        safe = method or refused or not (hasattr(builtins, fid) or fid in vars(multi_turn_utils))
        record = call_to_str(fid, checked) if checked is not None and safe else None
        if refused:
            return refused, record
        if method is None:
            return f"Error during execution: name {fid!r} is not defined", record
        if bad := _nonfinite(kwargs.values()):  # eval reads repr(inf) / repr(nan) as names
            return f"Error during execution: name {bad!r} is not defined", record
        if msg := _over_limit(name, kwargs):
            return f"Error during execution: {msg}", None
        try:
            return authors_result(method(**kwargs)), record
        except Exception as e:  # it ran: state may have changed
            return f"Error during execution: {e}", record

    def step(self, assistant_text):
        """Friendly: tool messages for a step with calls (or one error message); the next user turn ([] at the
        end) for a step without. Authors: one user message with all results for a step with valid calls; the
        next user turn (CONVERSATION_COMPLETED at the end) for a step without. Only calls that reached the
        backend (known tool, arguments bind) are recorded for the checker."""
        if self.done:
            return []
        self.steps += 1
        step = self._step_authors if self.protocol == "authors" else self._step_friendly
        out = step(assistant_text)
        if self.steps >= self.max_steps:
            self.done = True
        return out

    def _step_friendly(self, text):
        calls, error = parse_calls(text, self.action_format)
        if error is not None:
            return [{"role": "tool", "content": f"Error: {error}"}]
        if not calls:  # no call attempt: the user turn ends
            return self._end_turn()
        return [{"role": "tool", "content": result} for result in self._run_calls(calls)]

    def _step_authors(self, text):
        calls, _ = parse_calls(text, self.action_format, "authors")
        if not calls:  # no <tool_call> block with "name" and "arguments": the user turn ends
            return self._end_turn()
        ran = [self.execute_authors(name, args) for name, args in calls]
        self.calls[self.turn].append([record for _, record in ran if record])  # even [] marks the turn as called
        ids = [f"{name}_{k}" for k, (name, _) in enumerate(calls, 1)]
        return [{"role": "user", "content": authors_results_text(zip(ids, [result for result, _ in ran]))}]

    def _run_calls(self, calls):
        """Execute the calls in order; record those that reached the backend for the checker. Result texts."""
        results, executed = [], []
        for name, args in calls:
            result, ran = self.execute(name, args)
            results.append(result)
            if ran:
                executed.append(call_to_str(name, args))
        if executed:
            self.calls[self.turn].append(executed)
        return results

    def _end_turn(self):
        """The user turn ends: the next turn's messages; after the last turn the episode is done ([], or the
        authors' completion message). At the step cap: none (friendly), the next query anyway (authors: their env
        does not know the cap, the rollout loop stops after this step)."""
        authors = self.protocol == "authors"
        if self.turn + 1 == len(self.task["turns"]):
            self.done = self.completed = True
            return [{"role": "user", "content": CONVERSATION_COMPLETED}] if authors else []
        if self.steps >= self.max_steps and not authors:
            return []
        self.turn += 1
        self.calls.append([])
        turn = self.task["turns"][self.turn]
        return [{"role": "user", "content": _user_content(turn)}] if authors else [dict(m) for m in turn]

    def reward(self):
        """1.0 / 0.0 from the official checker, run on the recorded calls (strings we rendered ourselves)."""
        turns = self.calls
        if self.protocol == "authors":  # their env scores a completed conversation only; their
            # _extract_multi_turn_responses drops each turn without a tool call, and the checker fails on the count
            if not self.completed or not all(turns):
                return 0.0
            turns = [[step for step in turn if step] for turn in turns]
        elif len(turns) != len(self.task["turns"]):  # as the official runner: an episode cut short fails outright
            return 0.0
        entry = {"id": self.task["id"], "initial_config": self.task["initial_config"],
                 "involved_classes": self.task["involved_classes"]}
        model_name = f"hintsd_{uuid.uuid4().hex}"
        try:
            result = multi_turn_checker(turns, self.task["ground_truth"], entry, self.task["category"], model_name)
        finally:  # the checker keeps its instances in module globals, keyed by model_name
            g = vars(multi_turn_utils)
            for key in [k for k in g if k.startswith(model_name)]:
                del g[key]
        return 1.0 if result["valid"] else 0.0

    def ground_truth_calls(self, turn):
        """Ground-truth calls of a turn as [(name, kwargs)]; positional args bound to names via the backend."""
        calls = []
        for s in self.task["ground_truth"][turn]:
            (name, args), = _calls_from_ast(ast.List(elts=[ast.parse(s, mode="eval").body]), allow_positional=True)
            cls = next(c for c in self.task["involved_classes"] if hasattr(_backend_class(c), name))
            params = [p for p in inspect.signature(getattr(_backend_class(cls), name)).parameters if p != "self"]
            calls.append((name, {(params[k] if isinstance(k, int) else k): v for k, v in args.items()}))
        return calls

    def ground_truth_action(self, turn):
        """Assistant text issuing the ground-truth calls of `turn` (NO_CALL_TEXT when it has none)."""
        calls = self.ground_truth_calls(turn)
        return format_calls(calls, self.action_format) if calls else NO_CALL_TEXT

    def ground_truth_actions(self):
        """A whole successful episode as assistant texts: each turn's ground-truth calls in one step, then a
        step without calls that ends the turn (the SFT baseline's stand-in for a stronger model's rollout)."""
        out = []
        for turn in range(len(self.task["turns"])):
            if self.ground_truth_calls(turn):
                out.append(self.ground_truth_action(turn))
            out.append(NO_CALL_TEXT)
        return out


# -----------------------------------------------------------------------------
# ground-truth "oracle" hindsight


def oracle_feedback(task, steps, action_format="json", protocol="friendly"):
    """An upper bound for the hindsight analyzer: the first step whose calls leave the ground-truth path, with
    feedback that shows the right call in the action format. steps: [(turn, assistant_text)] in order, read with
    the parser of the protocol. Returns [(step_number_1_based, feedback)] (one entry), or [] when no step diverges.
    The feedback never quotes the wrong call: a small teacher shown the wrong call tends to repeat it."""
    env = BFCLEnv(task, action_format, protocol=protocol)
    turns = {}
    for i, (turn, text) in enumerate(steps, 1):
        turns.setdefault(turn, []).append((i, text))
    done_text = "The request is already done: answer in plain text, without a call."
    for turn, items in sorted(turns.items()):
        gt, done = env.ground_truth_calls(turn), 0
        for i, text in items:
            calls, error = parse_calls(text, action_format, protocol)
            right = f"The right call is:\n{format_calls(gt[done:done + 1], action_format)}" if done < len(gt) else None
            if error is not None:
                return [(i, f"Your call could not be run ({error[:150]}). " + (right or done_text))]
            if not calls and right:
                return [(i, f"The request is not done yet. {right}")]
            for c in calls:
                if done < len(gt) and c == gt[done]:
                    done += 1
                    continue
                return [(i, f"That call is wrong. {right}" if right else done_text)]
    return []


# -----------------------------------------------------------------------------
# checking a correction by replay (no ground truth)

CORRECTION_PROBLEMS = ("same", "unparsed", "unknown function", "error")
ERROR_TEXT = re.compile(r'^\s*Error|"content": "Error|"error"\s*:|Traceback \(most recent call last\)|Execution failed')


def correction_problem(task, earlier, action, student, action_format="json", max_steps=None, protocol="friendly"):
    """Why a corrected action should not be distilled at its step, or None if it passes: the environment is
    replayed to that step with the rollout's own earlier actions, then the action is executed. The reasons: "same"
    (it is the student's own action), "unparsed" (a call that does not parse), "unknown function", "error" (an
    error comes back). Only the environment is asked, never the ground truth."""
    if action.strip() == student.strip():
        return "same"
    env = make_env(task, action_format, max_steps, protocol)
    msgs = env.reset()
    for a in earlier:
        msgs = env.step(a)
    if task.get("bench") != "appworld":
        calls, error = parse_calls(action, action_format, protocol)
        if error is not None or (not calls and "<tool_call>" in action):
            return "unparsed"
        if any(name not in env.methods for name, _ in calls):
            return "unknown function"
    out = env.step(action)
    if hasattr(env, "close"):
        env.close()
    return "error" if any(ERROR_TEXT.search(str(m.get("content", ""))[:2000]) for m in out) else None


# =============================================================================
# AppWorld
"""AppWorld (appworld==0.1.3.post1): the agent writes Python that calls the apps' APIs (apis.<app>.<api>(...)).

    tasks = load_tasks("appworld", "train")    # splits train, dev, test_normal, test_challenge (eval = dev,
                                               # test = test_normal, all = the four); each task: id, category, bench
    env = make_env(tasks[0])                   # AppWorldEnv; at most 40 steps by default (the authors' cap)
    msgs = env.reset()                         # system (how to act, the api_docs / supervisor APIs) + user (task)
    msgs = env.step(assistant_text)            # [tool message with the code's output (clipped)]
    r = env.reward()                           # 1.0 if all of AppWorld's own evaluation tests pass, else 0.0

Action: the ```python blocks of the reply (joined), or the whole reply when it has no fence. The episode is done when
the code marks the task complete (apis.supervisor.complete_task, i.e. world.task_completed()) or at the step cap;
the reward is then computed at once (0 without evaluating when the task was not marked complete, as the authors'
env does) and the world closed. env.tools is [] (the APIs are code, not tools).

Process boundary: appworld pins pydantic<2 (it breaks our stack's pydantic 2 and transformers would run on
pydantic 1), keeps one open world per process, and freezes time.time / datetime (freezegun) while a world is
open. So each env owns a worker process in the AppWorld venv (bench/appworld_tasks.py serve, JSON lines over
stdin/stdout); the agent's code runs only there, inside AppWorld's own sandboxed world.execute.

Setup: `make setup-appworld` (venv .venv-appworld, `appworld install`). Data: with internet,
`.venv-appworld/bin/appworld download data --root .appworld_root` (or set APPWORLD_ROOT). Without data, the
three offline tasks of bench/appworld_tasks.py are built (real engine, ~15 s) into a temporary root and used for
every split, with a notice on stderr.
"""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import weakref

REPO = Path(__file__).resolve().parent
APPWORLD_PYTHON = os.environ.get("HINTSD_APPWORLD_PYTHON", str(REPO / ".venv-appworld" / "bin" / "python"))
APPWORLD_WORKER = REPO / "bench" / "appworld_tasks.py"
APPWORLD_SPLITS = ("train", "dev", "test_normal", "test_challenge")
APPWORLD_ALIASES = {"eval": "dev", "test": "test_normal"}
APPWORLD_MAX_STEPS = 40
APPWORLD_MAX_OUTPUT = 4000  # characters of one execution output shown to the agent (head and tail kept)
APPWORLD_MISSING = ("AppWorld is not installed (expected {python}). Install it in its own venv with "
                    "`make setup-appworld` (pip install appworld, then appworld install), or point "
                    "HINTSD_APPWORLD_PYTHON at a python that has it. Real tasks need internet once: "
                    "`.venv-appworld/bin/appworld download data --root .appworld_root` (or set APPWORLD_ROOT); "
                    "without data, three small offline tasks are built and used.")
APPWORLD_SYSTEM = """You are an agent that completes tasks for your supervisor by writing Python code that calls the \
APIs of the apps on their phone.

Each reply is one ```python block. The code runs in a persistent Python session (variables stay defined between \
steps) and you see what it prints. `apis` is already defined (do not import it): call APIs as \
apis.<app_name>.<api_name>(arg=value, ...); they return JSON-like data. Look up APIs before using them, e.g. \
print(apis.api_docs.show_api_descriptions(app_name="simple_note")) and \
print(apis.api_docs.show_api_doc(app_name="simple_note", api_name="login")). Your account passwords are in \
apis.supervisor.show_account_passwords(). Work step by step, print what you need to check, and do not guess.
When the task is done, call apis.supervisor.complete_task(answer=...) if the task asks a question, else \
apis.supervisor.complete_task(). This ends the episode.

APIs to start with:
{docs}"""
APPWORLD_USER = """I am {first_name} {last_name}, email {email}, phone number {phone_number}. It is {datetime}.
The apps:
{apps}

Task: {instruction}"""
CODE_BLOCK = re.compile(r"```([\w+-]*)[ \t]*\n(.*?)(?:```|$)", re.DOTALL)  # (language, body); last may be open
CODE_LANGUAGES = ("python", "py", "python3", "")
_offline_root = None


def appworld_available():
    return Path(APPWORLD_PYTHON).exists()


def _require_appworld():
    if not appworld_available():
        raise RuntimeError(APPWORLD_MISSING.format(python=APPWORLD_PYTHON))


def appworld_root():
    """The user's AppWorld root (data/ under it): $APPWORLD_ROOT, else .appworld_root in the repo."""
    return Path(os.environ.get("APPWORLD_ROOT", REPO / ".appworld_root"))


def build_offline_appworld(root):
    """Build the offline tasks (bench/appworld_tasks.py) into root/data with the AppWorld venv."""
    _require_appworld()
    run = subprocess.run([APPWORLD_PYTHON, str(APPWORLD_WORKER), "build", str(root)], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"building the offline AppWorld tasks failed:\n{run.stderr[-3000:]}")
    return Path(root)


def _offline_appworld_root():
    global _offline_root
    if _offline_root is None:
        tmp = Path(tempfile.mkdtemp(prefix="hintsd-appworld-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        _offline_root = build_offline_appworld(tmp)
    return _offline_root


def load_appworld_tasks(split):
    """Task dicts of an AppWorld split, in the dataset's order; the offline tasks when no real data is there."""
    names = APPWORLD_SPLITS if split == "all" else [APPWORLD_ALIASES.get(split, split)]
    if names[0] not in APPWORLD_SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {APPWORLD_SPLITS + tuple(APPWORLD_ALIASES) + ('all',)}")
    _require_appworld()
    root = appworld_root()
    if not (root / "data" / "datasets" / f"{names[0]}.txt").exists():
        print(f"AppWorld: no data under {root / 'data'} (get it with `.venv-appworld/bin/appworld download data "
              f"--root {root}`, needs internet); using the offline tasks of bench/appworld_tasks.py.", file=sys.stderr)
        root = _offline_appworld_root()
    tasks = []
    for name in names:
        for line in (root / "data" / "datasets" / f"{name}.txt").read_text().split():
            tid = line.split(":")[0]  # AppWorld dataset lines may carry a ":tag"
            meta = root / "data" / "tasks" / tid / "ground_truth" / "metadata.json"
            level = json.loads(meta.read_text()).get("difficulty") if meta.exists() else None
            tasks.append({"id": tid, "bench": "appworld", "split": name, "root": str(root),
                          "category": f"difficulty_{level}" if level else "appworld"})
    return tasks


def extract_code(text):
    """The reply's ```python (or unlabelled) blocks joined, an unclosed last one included; the whole reply when it
    has no fenced block at all; "" when it only has blocks of other languages (AppWorld: "No code available")."""
    blocks = CODE_BLOCK.findall(text)
    if not blocks:
        return text
    return "\n".join(body.strip("\n") for lang, body in blocks if lang.lower() in CODE_LANGUAGES)


def clip_output(text, limit=APPWORLD_MAX_OUTPUT):
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n... [{len(text) - 2 * half} characters cut] ...\n{text[-half:]}"


class AppWorldEnv:
    """One AppWorld task, played in its own worker process (started here, so several envs import in parallel)."""

    def __init__(self, task, max_steps=APPWORLD_MAX_STEPS, timeout=100, max_output=APPWORLD_MAX_OUTPUT):
        _require_appworld()
        self.task, self.max_steps, self.timeout, self.max_output = task, max_steps, timeout, max_output
        self.tools, self.turn, self.steps, self.done, self.completed = [], 0, 0, True, False
        self.evaluation, self.proc = None, None
        self._start()

    def _start(self):
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([APPWORLD_PYTHON, str(APPWORLD_WORKER), "serve", self.task["root"]],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=self.task["root"])
        self._finalizer = weakref.finalize(self, _stop_worker, self.proc)

    def _call(self, cmd, **kwargs):
        if self.proc is None:
            raise RuntimeError("the AppWorld worker is closed; call reset() first")
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"AppWorld worker died during {cmd!r}:\n{self.log.read()[-3000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"AppWorld {cmd!r} failed: {reply['error']}")
        return reply

    def reset(self):
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.turn, self.steps, self.done, self.completed, self.evaluation = 0, 0, False, False, None
        self.experiment = f"hintsd_{uuid.uuid4().hex[:12]}"  # own output dir: rollouts of one task run side by side
        info = self._call("reset", task_id=self.task["id"], experiment=self.experiment, timeout=self.timeout)
        apps = "\n".join(f"- {name}: {desc}" for name, desc in info["apps"].items())
        return [{"role": "system", "content": APPWORLD_SYSTEM.format(docs="\n".join(info["docs"]))},
                {"role": "user", "content": APPWORLD_USER.format(**info["supervisor"], datetime=info["datetime"],
                                                                 apps=apps, instruction=info["instruction"])}]

    def step(self, assistant_text):
        """Run the reply's code in the world; one tool message with its output. Done on complete_task or the cap."""
        if self.done:
            return []
        self.steps += 1
        out = self._call("execute", code=extract_code(assistant_text))
        self.completed = bool(out["completed"])  # the agent called complete_task
        if out["completed"] or self.steps >= self.max_steps:
            self._finish()
        return [{"role": "tool", "content": clip_output(out["output"], self.max_output)}]

    def _finish(self):
        """Evaluate the world's state now (AppWorld's own tests), if the agent marked the task complete, and close
        the worker. As in the authors' env (appworld_env.step), an unfinished episode is not evaluated: reward 0."""
        self.done = True
        if self.evaluation is None:
            self.evaluation = self._call("evaluate") if self.completed else {"success": False}
            self.close()

    def reward(self):
        """1.0 if the task was marked complete and every test of its evaluation passes, else 0.0."""
        self._finish()
        return 1.0 if self.evaluation["success"] else 0.0

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                self._call("close")
            except RuntimeError:
                pass
        self._finalizer()
        self.proc = None


def _stop_worker(proc):
    if proc.poll() is None:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
