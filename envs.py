"""Tool-use environments for HINT-SD. For now: BFCL v3 multi-turn (base + long_context).

    tasks = load_tasks("bfcl", "train")          # list of task dicts, paper split 200/40/160
    env = make_env(tasks[0], action_format="json")
    msgs = env.reset()                           # first chat messages; env.tools goes to the chat template
    while not env.done:
        msgs = env.step(assistant_text)          # tool results, or the next user turn, or [] when done
    r = env.reward()                             # 1.0 / 0.0 from the official BFCL multi-turn checker

A step whose text holds at least one call executes the calls and returns one tool message per call
(errors included, as "Error: ..."). A step without any call attempt ends the user turn. Two action formats:
  json:   <tool_call>{"name": "cd", "arguments": {"folder": "docs"}}</tool_call>  (one block per call;
          a reply that is only bare JSON call objects, as small models often write, counts too)
  python: [cd(folder="docs"), ls(a=True)]                                      (keyword literals only)

max_steps caps the assistant steps of the whole episode (official BFCL caps 20 steps per user turn). As in
the official runner, an episode stopped before its last user turn gets reward 0.

Safety: model text is never eval'd. Calls are parsed with json / ast.literal_eval, dispatched by name to
the backend instance, and the official checker (which eval()s call strings) only sees strings that we
render ourselves from validated calls.
"""
import ast
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
from pathlib import Path

import bfcl_eval
from bfcl_eval.constants.executable_backend_config import (
    CLASS_FILE_PATH_MAPPING, MULTI_TURN_FUNC_DOC_FILE_MAPPING, STATELESS_CLASSES)
from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils
from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker

BENCHES = ("bfcl",)            # appworld will be added later
SPLITS = ("train", "eval", "test", "all")
ACTION_FORMATS = ("json", "python")

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
SYSTEM_JSON = ("You are an agent that completes the user's requests by calling the provided functions. "
               "You may call functions over several steps and will see their results. When the request "
               "is done, or cannot be done with the functions, answer in plain text without a call.")
SYSTEM_PYTHON = (SYSTEM_JSON + "\n\nTo call functions, answer with only a Python list of calls with keyword "
                 "arguments, e.g. [func_a(x=1), func_b(name=\"y\")]. Otherwise answer in plain text.\n"
                 "The available functions (JSON):\n{docs}")

# -----------------------------------------------------------------------------
# tasks


def _read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def _load_bfcl():
    tasks = []
    for cat in BFCL_CATEGORIES:
        questions = _read_jsonl(BFCL_DATA / f"BFCL_v4_{cat}.json")
        answers = {a["id"]: a["ground_truth"] for a in _read_jsonl(BFCL_DATA / "possible_answer" / f"BFCL_v4_{cat}.json")}
        for q in questions:
            tasks.append({"id": q["id"], "category": cat, "turns": q["question"],
                          "initial_config": q["initial_config"], "involved_classes": q["involved_classes"],
                          "excluded_function": q.get("excluded_function", []),
                          "ground_truth": answers[q["id"]], "long_context": cat == "multi_turn_long_context"})
    return tasks


def load_tasks(bench, split):
    if bench not in BENCHES:
        raise ValueError(f"unknown bench {bench!r}; allowed: {BENCHES}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {SPLITS}")
    tasks = _load_bfcl()
    random.Random(SPLIT_SEED).shuffle(tasks)
    if split == "all":
        return tasks
    lo, hi = SPLIT_FRACTIONS[split]
    return tasks[round(lo * len(tasks)):round(hi * len(tasks))]


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
    return [copy.deepcopy(t) for c in involved_classes for t in _class_tools(c) if t["function"]["name"] not in excluded]


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
    if not isinstance(obj, dict) or "name" not in obj:
        raise ValueError('expected {"name": ..., "arguments": {...}}')
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


def _bare_json_objects(text):
    """Small models often drop the <tool_call> tags. A reply that is nothing but JSON call objects
    (optionally in a code fence, one after another or as a list) still counts as calls; None otherwise."""
    body = re.sub(r"^```[a-z]*\s*|\s*```$", "", text.strip())
    if not body.startswith(("{", "[")) or '"name"' not in body:
        return None
    dec, objs, i = json.JSONDecoder(), [], 0
    while i < len(body):
        obj, i = dec.raw_decode(body, i)
        objs += obj if isinstance(obj, list) else [obj]
        while i < len(body) and body[i] in " \t\r\n,":
            i += 1
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


def _parse_python(text):
    stripped = text.strip()
    m = CALL_LIST_START.search(text)
    if m is None and not stripped.startswith("["):
        return [], None
    src = text[m.start():] if m else stripped
    ends = [i + 1 for i, c in enumerate(src) if c == "]"][::-1]  # try the longest candidate first
    error = "unbalanced brackets"
    for end in ends:
        try:
            node = ast.parse(src[:end], mode="eval").body
        except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
            error = str(e)
            continue
        try:
            return _check_calls(_calls_from_ast(node))
        except ValueError as e:
            return [], str(e)
    return [], f"could not parse the call list: {error}"


def parse_calls(text, action_format):
    """Assistant text -> (calls, error). calls: [(name, kwargs)]. All or nothing: if any call is
    malformed, calls is [] and error says why. ([], None) means the text makes no call attempt."""
    if action_format not in ACTION_FORMATS:
        raise ValueError(f"unknown action format {action_format!r}; allowed: {ACTION_FORMATS}")
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


def make_env(task, action_format="json", max_steps=20):
    return BFCLEnv(task, action_format, max_steps)


def _backend_class(name):
    return getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[name]), name)


class BFCLEnv:
    """One BFCL multi-turn task with live backend instances. Construction already resets it."""

    def __init__(self, task, action_format="json", max_steps=20):
        if action_format not in ACTION_FORMATS:
            raise ValueError(f"unknown action format {action_format!r}; allowed: {ACTION_FORMATS}")
        self.task, self.action_format, self.max_steps = task, action_format, max_steps
        self.tools = bfcl_tools(task["involved_classes"], task.get("excluded_function") or ())
        self.tool_names = {t["function"]["name"] for t in self.tools}
        self.reset()

    def reset(self):
        self.turn, self.steps, self.done = 0, 0, False
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
        first = [dict(m) for m in self.task["turns"][0]]
        if self.action_format == "json":
            return [{"role": "system", "content": SYSTEM_JSON}] + first
        docs = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in self.tools)
        return [{"role": "system", "content": SYSTEM_PYTHON.format(docs=docs)}] + first

    def execute(self, name, args):
        """Run one parsed call on the backend; returns (result text, whether it ran)."""
        if name not in self.methods:
            return f"Error: unknown function {name!r}.", False
        method = self.methods[name]
        try:
            inspect.signature(method).bind(**args)
        except TypeError as e:
            return f"Error: bad arguments for {name}: {e}", False
        for k, v in args.items():
            limit = ARG_LIMITS.get((name, k))
            if limit is not None and isinstance(v, (int, float)) and abs(v) > limit:
                return f"Error: argument {k!r} of {name} must be at most {limit} in magnitude.", False
        try:
            result = method(**args)
            return (result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)), True
        except Exception as e:
            return f"Error: {name} raised {type(e).__name__}: {e}", True  # it ran: state may have changed

    def step(self, assistant_text):
        """Tool messages for a step with calls; next user turn ([] at the end) for a step without.
        Only calls that reached the backend (known tool, arguments bind) are recorded for the checker."""
        if self.done:
            return []
        self.steps += 1
        calls, error = parse_calls(assistant_text, self.action_format)
        if error is not None:
            out = [{"role": "tool", "content": f"Error: {error}"}]
        elif calls:
            out, executed = [], []
            for name, args in calls:
                result, ran = self.execute(name, args)
                out.append({"role": "tool", "content": result})
                if ran:
                    executed.append(call_to_str(name, args))
            if executed:
                self.calls[self.turn].append(executed)
        else:  # no call attempt: the user turn ends
            out = []
            if self.turn + 1 == len(self.task["turns"]):
                self.done = True
            elif self.steps < self.max_steps:
                self.turn += 1
                self.calls.append([])
                out = [dict(m) for m in self.task["turns"][self.turn]]
        if self.steps >= self.max_steps:
            self.done = True
        return out

    def reward(self):
        """1.0 / 0.0 from the official checker, run on the recorded calls (strings we rendered ourselves)."""
        # as the official runner: an episode cut short (fewer turns than the task) fails outright
        if len(self.calls) != len(self.task["turns"]):
            return 0.0
        entry = {"id": self.task["id"], "initial_config": self.task["initial_config"],
                 "involved_classes": self.task["involved_classes"]}
        model_name = f"hintsd_{uuid.uuid4().hex}"
        try:
            result = multi_turn_checker(self.calls, self.task["ground_truth"], entry, self.task["category"], model_name)
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


# -----------------------------------------------------------------------------
# ground-truth "oracle" hindsight


def oracle_feedback(task, steps, action_format="json"):
    """An upper bound for the hindsight analyzer: the first step whose calls leave the ground-truth path,
    with feedback that names the correct call. steps: [(turn, assistant_text)] in order. Returns
    [(step_number_1_based, feedback)] (one entry), or [] when no step diverges."""
    env = BFCLEnv(task, action_format)
    turns = {}
    for i, (turn, text) in enumerate(steps, 1):
        turns.setdefault(turn, []).append((i, text))
    for turn, items in sorted(turns.items()):
        gt, done = env.ground_truth_calls(turn), 0
        for i, text in items:
            calls, error = parse_calls(text, action_format)
            want = call_to_str(*gt[done]) if done < len(gt) else None
            if error is not None:
                return [(i, f"Your call could not be run ({error[:150]}). "
                            + (f"You should call {want}." if want else "You should answer in plain text."))]
            if not calls and want:
                return [(i, f"The request is not done yet: you should call {want}.")]
            for c in calls:
                if done < len(gt) and c == gt[done]:
                    done += 1
                    continue
                return [(i, f"You should call {want} instead of {call_to_str(*c)}." if want else
                            f"You should not call {call_to_str(*c)}: the request is already done; answer in plain text.")]
    return []
