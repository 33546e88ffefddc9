"""BFCL multi-turn environment: split, fidelity against the official checker, malformed input, safety, the authors'
protocol, tasks cut to their first turns, hostile input."""
import json
import os
import random
import time

import pytest
from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils

import envs

BFCL_DOCS = envs.BFCL_DATA / "multi_turn_func_doc"
PROTOCOL_FORMATS = [("friendly", "json"), ("friendly", "python"), ("authors", "json")]
# tasks with an empty ground-truth turn: a replay without a call there fails under the authors' protocol
EMPTY_TURN_TASKS = ["multi_turn_base_167", "multi_turn_base_180", "multi_turn_long_context_167",
                    "multi_turn_long_context_180"]
JSON_SCHEMA_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


@pytest.fixture(scope="module")
def all_tasks():
    return envs.load_tasks("bfcl", "all")


def task_by_id(tasks, tid):
    return next(t for t in tasks if t["id"] == tid)


def replay_ground_truth(env):
    """env.ground_truth_actions(): each turn's ground-truth calls as one step, then a no-call step."""
    env.reset()
    for text in env.ground_truth_actions():
        out = env.step(text)
        errors = [m for m in out if m["content"].startswith("Error:") or "Error during execution" in m["content"]]
        assert not errors, (env.task["id"], env.turn, out)
    assert env.done
    return env.reward()


# -----------------------------------------------------------------------------
# tasks and split

def test_split_sizes_pinned_and_disjoint():
    splits = {s: envs.load_tasks("bfcl", s) for s in ("train", "eval", "test", "all")}
    assert [len(splits[s]) for s in ("train", "eval", "test", "all")] == [200, 40, 160, 400]
    ids = {s: [t["id"] for t in ts] for s, ts in splits.items()}
    assert ids["test"][:3] == ["multi_turn_base_41", "multi_turn_long_context_70", "multi_turn_base_95"]
    assert ids["train"][:3] == ["multi_turn_long_context_49", "multi_turn_base_94", "multi_turn_base_158"]
    assert ids["eval"][:3] == ["multi_turn_base_54", "multi_turn_long_context_96", "multi_turn_long_context_45"]
    train, eval_, test = set(ids["train"]), set(ids["eval"]), set(ids["test"])
    assert not (train & eval_ or train & test or eval_ & test)
    assert train | eval_ | test == set(ids["all"])
    assert ids == {s: [t["id"] for t in envs.load_tasks("bfcl", s)] for s in splits}  # deterministic


def test_task_fields(all_tasks):
    t = task_by_id(all_tasks, "multi_turn_long_context_0")
    assert set(t) == {"id", "category", "turns", "initial_config", "involved_classes", "excluded_function",
                      "ground_truth", "long_context"}
    assert t["long_context"] and t["category"] == "multi_turn_long_context" and t["excluded_function"] == ["cp"]
    assert len(t["turns"]) == len(t["ground_truth"]) and t["turns"][0][0]["role"] == "user"
    assert sum(t["long_context"] for t in all_tasks) == 200


def test_unknown_bench_split_format():
    with pytest.raises(ValueError, match="bfcl"):
        envs.load_tasks("nope", "train")
    with pytest.raises(ValueError, match="train"):
        envs.load_tasks("bfcl", "dev")
    with pytest.raises(ValueError, match="json"):
        envs.make_env(envs.load_tasks("bfcl", "eval")[0], action_format="xml")


def test_tool_schemas_are_json_schema(all_tasks):
    def check(schema):
        assert schema.get("type") in JSON_SCHEMA_TYPES, schema
        for sub in schema.get("properties", {}).values():
            check(sub)
        if "items" in schema:
            check(schema["items"])

    for task in all_tasks:
        env = envs.make_env(task)
        names = [t["function"]["name"] for t in env.tools]
        assert len(names) == len(set(names)) and not set(names) & set(task["excluded_function"])
        for tool in env.tools:
            assert tool["type"] == "function" and set(tool["function"]) == {"name", "description", "parameters"}
            check(tool["function"]["parameters"])


def test_reset_messages(all_tasks):
    task = all_tasks[0]
    msgs = envs.make_env(task, "json").reset()
    assert msgs[0]["role"] == "system" and msgs[1:] == task["turns"][0]
    msgs = envs.make_env(task, "python").reset()
    assert msgs[0]["role"] == "system" and msgs[1:] == task["turns"][0]
    assert '"name": "' + envs.make_env(task).tools[0]["function"]["name"] in msgs[0]["content"]


# -----------------------------------------------------------------------------
# fidelity: ground-truth replay passes the official checker

@pytest.mark.parametrize("protocol,action_format", PROTOCOL_FORMATS)
def test_ground_truth_replay_gets_full_reward(all_tasks, protocol, action_format):
    t0 = time.time()
    rewards = {t["id"]: replay_ground_truth(envs.make_env(t, action_format, protocol=protocol)) for t in all_tasks}
    failed = [tid for tid, r in rewards.items() if r != 1.0]
    print(f"\n{protocol} {action_format}: {len(rewards) - len(failed)}/{len(rewards)} ground-truth replays valid "
          f"in {time.time() - t0:.1f}s")
    assert len(rewards) == 400 and sorted(failed) == (EMPTY_TURN_TASKS if protocol == "authors" else []), failed


def test_wrong_actions_get_zero(all_tasks):
    for task in all_tasks[:20]:
        env = envs.make_env(task)
        env.reset()
        while not env.done:
            env.step("I am not sure how to help with that.")
        assert env.turn == len(task["turns"]) - 1 and env.reward() == 0.0


def test_dropping_one_ground_truth_call_gets_zero(all_tasks):
    for task in all_tasks[:40]:
        env = envs.make_env(task)
        env.reset()
        first = next(i for i, gt in enumerate(task["ground_truth"]) if gt)
        for turn in range(len(task["turns"])):
            calls = env.ground_truth_calls(turn)[:-1] if turn == first else env.ground_truth_calls(turn)
            if calls:
                env.step(envs.format_calls(calls, "json"))
            if env.turn == turn and not env.done:
                env.step("Done.")
        assert env.reward() == 0.0, task["id"]


@pytest.mark.parametrize("protocol", envs.ACTION_PROTOCOLS)
def test_episode_cut_short_gets_zero(all_tasks, protocol):
    task = next(t for t in all_tasks if len(t["turns"]) >= 3 and t["ground_truth"][0])
    env = envs.make_env(task, max_steps=2, protocol=protocol)
    env.reset()
    assert env.step(env.ground_truth_action(0)) and not env.done
    out = env.step("Done.")  # cap reached: friendly gives no next user turn, the authors' env gives it anyway
    assert env.done and (env.turn, out) == ((1, [{"role": "user", "content": task["turns"][1][0]["content"]}])
                                            if protocol == "authors" else (0, []))
    assert env.reward() == 0.0
    assert env.step("anything") == [] and env.steps == 2  # stepping a finished episode is a no-op


# -----------------------------------------------------------------------------
# parsing, malformed input, safety

def test_parse_format_roundtrip():
    calls = [("cd", {"folder": "a 'b' \"c\""}), ("mean", {"numbers": [1, 2.5, -3]}), ("ls", {}),
             ("post", {"tags": ["#x"], "meta": {"k": None, "b": True}})]
    for fmt in envs.ACTION_FORMATS:
        assert envs.parse_calls(envs.format_calls(calls, fmt), fmt) == (calls, None)
    text = 'Sure.\n```python\n[cd(folder="x")]\n```\nDone'
    assert envs.parse_calls(text, "python") == ([("cd", {"folder": "x"})], None)
    text = '<tool_call>  {"name": "ls", "arguments": "{\\"a\\": true}"} \n'
    assert envs.parse_calls(text, "json") == ([("ls", {"a": True})], None)
    for fmt in envs.ACTION_FORMATS:
        assert envs.parse_calls("All done, the file is moved.", fmt) == ([], None)
    assert envs.parse_calls("[]", "python") == ([], None)


MALFORMED = {
    "json": ['<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
             '<tool_call>{"name": "ls", "arguments": {"bogus": 1}}</tool_call>',
             '<tool_call>{"name": "ls", "arguments": {"a": tru</tool_call>',
             '<tool_call>{"name": "ls", "arguments": {"a=1),__import__(\'os\').system(\'x\'),ls(a": 1}}</tool_call>',
             '<tool_call>["ls"]</tool_call>',
             '{"name": "ls", " arguments": {"a": true}}'],  # a misspelt key: not run as ls() without its arguments
    "python": ['[os.system("x")]', '[ls(a=__import__("os"))]', "[ls(True)]", "[ls(a=True",
               "[ls(**{'a': True})]", "[nope(a=1)]", "[ls(bogus=1)]", "[x for x in ls()]"],
}


@pytest.mark.parametrize("action_format", envs.ACTION_FORMATS)
def test_malformed_calls_give_errors_and_execute_nothing(all_tasks, action_format, monkeypatch):
    monkeypatch.setattr(os, "system", lambda *a: pytest.fail("os.system was called"))
    task = task_by_id(all_tasks, "multi_turn_base_0")  # GorillaFileSystem + TwitterAPI
    env = envs.make_env(task, action_format)
    env.reset()
    for text in MALFORMED[action_format]:
        out = env.step(text)
        assert len(out) == 1 and out[0]["role"] == "tool" and out[0]["content"].startswith("Error: "), (text, out)
    assert env.calls == [[]] and env.turn == 0 and not env.done
    assert env.steps == len(MALFORMED[action_format])


def test_backend_exception_becomes_error_message(all_tasks, monkeypatch):
    env = envs.make_env(task_by_id(all_tasks, "multi_turn_base_0"), "python")
    env.reset()
    out = env.step("[cd(folder=5), pwd()]")  # the real backend raises AttributeError on an int folder
    assert out[0]["content"].startswith("Error: cd raised AttributeError") and "workspace" in out[1]["content"]

    def boom(**kw):
        raise RuntimeError("backend blew up")
    monkeypatch.setitem(env.methods, "ls", boom)
    out = env.step("[ls(a=True)]")
    assert out == [{"role": "tool", "content": "Error: ls raised RuntimeError: backend blew up"}]


def test_excluded_function_is_unknown(all_tasks):
    env = envs.make_env(task_by_id(all_tasks, "multi_turn_base_0"), "python")  # excludes cp
    env.reset()
    assert env.step("[cp(source='a', destination='b')]")[0]["content"].startswith("Error: unknown function")


def test_huge_numeric_arguments_are_refused(all_tasks):
    task = next(t for t in all_tasks if "MathAPI" in t["involved_classes"])
    env = envs.make_env(task, "python")
    env.reset()
    out = env.step("[power(base=10, exponent=10**9)]")  # not a literal
    assert out[0]["content"].startswith("Error:")
    out = env.step("[power(base=10, exponent=1000000000), logarithm(value=2, base=10, precision=100000000)]")
    assert all(m["content"].startswith("Error: argument") for m in out) and env.calls == [[]]


def test_checker_globals_do_not_grow(all_tasks):
    before = set(vars(multi_turn_utils))
    for task in all_tasks[:30]:
        env = envs.make_env(task, "json")
        replay_ground_truth(env)
        env.reward()  # twice on the same env: a fresh checker state each time
    assert set(vars(multi_turn_utils)) == before


def test_bare_json_calls_without_tags_count_as_calls():
    """Qwen2.5-Coder-0.5B often writes the call object without <tool_call> tags, sometimes fenced."""
    for text in ['{"name": "cd", "arguments": {"folder": "docs"}}',
                 '```json\n{"name": "cd", "arguments": {"folder": "docs"}}\n```',
                 '[{"name": "cd", "arguments": {"folder": "docs"}}, {"name": "ls", "arguments": {}}]',
                 '{"name": "cd", "arguments": {"folder": "docs"}}\n{"name": "ls", "arguments": {}}']:
        calls, err = envs.parse_calls(text, "json")
        assert err is None and calls[0] == ("cd", {"folder": "docs"}), text
    assert envs.parse_calls("I moved to docs. {not json}", "json") == ([], None)  # prose ends the turn
    calls, err = envs.parse_calls('{"name": "cd", "arguments": {"folder": ', "json")
    assert calls == [] and "could not parse" in err


def test_oracle_points_at_the_first_diverging_step():
    task = next(t for t in envs.load_tasks("bfcl", "train") if len(t["ground_truth"][0]) >= 2)
    env = envs.make_env(task)
    gt = env.ground_truth_calls(0)
    good = envs.format_calls(gt[:1], "json")
    bad = envs.format_calls([("definitely_wrong", {})], "json")
    [(step, fb)] = envs.oracle_feedback(task, [(0, good), (0, bad)])
    assert step == 2 and fb == "That call is wrong. The right call is:\n" + envs.format_calls(gt[1:2], "json")
    assert "definitely_wrong" not in fb  # the wrong call is never quoted back
    assert envs.parse_calls(fb.split("\n", 1)[1], "json") == ([gt[1]], None)  # the right call, as an action
    assert envs.oracle_feedback(task, [(0, "I am done.")])[0][0] == 1
    done = [(0, envs.format_calls(gt, "json")), (0, good)]  # every call made, then one more
    assert envs.oracle_feedback(task, done) == [(2, "The request is already done: answer in plain text, without "
                                                    "a call.")]
    replay = [(turn, env.ground_truth_action(turn)) for turn in range(len(task["turns"]))]
    assert envs.oracle_feedback(task, replay) == []


def test_python_format_gives_the_template_no_tools_and_lists_docs_itself():
    task = envs.load_tasks("bfcl", "test")[0]
    env = envs.make_env(task, action_format="python")
    system = env.reset()[0]["content"]
    assert env.tools == [] and len(env.schemas) == len(envs.make_env(task).tools)
    assert all(t["function"]["name"] in system for t in env.schemas) and "[func_a(x=1)" in system


# -----------------------------------------------------------------------------
# the authors' protocol (wgcyeo/HINT-SD env/service/environments/bfcl)

def authors_prompt_from_raw_docs(task):
    """The authors' system message, built here straight from bfcl_eval's doc files (their tools_schema_to_qwen_prompt
    over populate_test_cases_with_predefined_functions' list)."""
    tools = []
    for cls in task["involved_classes"]:
        path = BFCL_DOCS / envs.MULTI_TURN_FUNC_DOC_FILE_MAPPING[cls]
        tools += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = ["\n\n# Tools\n", "You may call one or more functions to assist with the user query.\n",
             "You are provided with function signatures within <tools></tools> XML tags:", "<tools>"]
    lines += [json.dumps(tool, ensure_ascii=False, separators=(",", ":")) for tool in tools]
    lines += ["</tools>\n",
              "Important: Always use only the latest tool list provided, ignoring any functions mentioned in previous "
              "messages.",
              "For each function call, return a json object with function name and arguments within <tool_call> and "
              "<tool_call> XML tags:",
              "<tool_call>", '{"name": <function-name>, "arguments": <args-json-object>}', "</tool_call>"]
    return "\n".join(lines), [t["name"] for t in tools]


def authors_env(all_tasks, tid="multi_turn_base_0"):
    env = envs.make_env(task_by_id(all_tasks, tid), protocol="authors")
    env.reset()
    return env


def test_authors_system_prompt_lists_all_raw_docs(all_tasks):
    for tid in ("multi_turn_long_context_0", "multi_turn_base_0"):  # both exclude "cp"
        task = task_by_id(all_tasks, tid)
        env = envs.make_env(task, protocol="authors")
        system, names = authors_prompt_from_raw_docs(task)
        assert env.reset() == [{"role": "system", "content": system},
                               {"role": "user", "content": task["turns"][0][0]["content"]}]
        assert env.tools == [] and "cp" in task["excluded_function"] and "cp" in names
        assert all(f'{{"name":"{n}",' in system for n in names) and set(names) == set(env.methods)
        assert '"type":"dict"' in system and "<tool_call> and <tool_call> XML tags" in system  # raw docs, the typo
    assert "cp" not in envs.make_env(task_by_id(all_tasks, "multi_turn_base_0")).methods


def test_protocol_validation(all_tasks):
    task = all_tasks[0]
    assert envs.ACTION_PROTOCOLS == ("authors", "friendly")
    with pytest.raises(ValueError, match="authors.*friendly"):
        envs.make_env(task, protocol="paper")
    with pytest.raises(ValueError, match="json"):
        envs.make_env(task, "python", protocol="authors")
    with pytest.raises(ValueError, match="json"):
        envs.parse_calls("[ls()]", "python", "authors")
    with pytest.raises(ValueError, match="authors"):
        envs.oracle_feedback(task, [], protocol="nope")


AUTHORS_TURN_ENDERS = [
    "I have moved the file.",                                                      # plain text
    '<tool_call>{"name": "ls", "arguments": {"a": tru}}</tool_call>',              # malformed JSON in tags
    '{"name": "ls", "arguments": {"a": true}}',                                    # bare JSON, no tags
    '<tool_call>{"name": "ls"}</tool_call>',                                       # no "arguments"
    '<tool_call>["ls"]</tool_call>',                                               # not an object
]


@pytest.mark.parametrize("text", AUTHORS_TURN_ENDERS)
def test_authors_reply_without_a_valid_call_ends_the_turn(all_tasks, text):
    env = authors_env(all_tasks)
    out = env.step(text)
    assert out == [{"role": "user", "content": env.task["turns"][1][0]["content"]}]
    assert env.turn == 1 and env.calls == [[], []] and not env.done


def test_authors_last_turn_ends_with_conversation_completed(all_tasks):
    env = authors_env(all_tasks)
    for turn in range(1, len(env.task["turns"])):
        assert env.step("Done.") == [{"role": "user", "content": env.task["turns"][turn][0]["content"]}]
    assert env.step("Done.") == [{"role": "user", "content": "[CONVERSATION_COMPLETED]"}] and env.done
    assert env.step("more") == [] and env.reward() == 0.0


def test_authors_skips_malformed_blocks_and_runs_the_good_ones(all_tasks):
    env = authors_env(all_tasks)
    out = env.step('<tool_call>{"name": "ls", "arguments": {"a": tru}}</tool_call>\n'
                   '<tool_call>{"name": "pwd", "arguments": {}}</tool_call>')
    assert out == [{"role": "user", "content": '<tool_call>\n{"name": "pwd_1", "content": '
                                               '{"current_working_directory": "/workspace"}}\n</tool_call>\n'}]
    assert env.calls == [[["pwd()"]]] and env.turn == 0
    # their regex's lazy {.*?} runs on to the next "}</tool_call>": a block without its "}" swallows the next one
    text = ('<tool_call>{"name": "ls", "arguments": {</tool_call>\n'
            '<tool_call>{"name": "pwd", "arguments": {}}</tool_call>')
    assert envs.parse_calls(text, "json", "authors") == ([], None)
    calls, error = envs.parse_calls(text, "json")
    assert calls == [] and "could not parse" in error  # friendly: an error message, the turn stays open


def test_authors_results_come_back_as_one_user_message(all_tasks):
    env = authors_env(all_tasks)
    out = env.step('Let me look.\n<tool_call>\n{"name": "pwd", "arguments": {}}\n</tool_call>\n'
                   '<tool_call>{"name": "cd", "arguments": {"folder": "nope"}}</tool_call> and '
                   '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>{"name": "pwd", "arguments": '
                   '"{}"}</tool_call><tool_call>{"name": "cd", "arguments": {"folder": 5}}</tool_call>')
    blocks = [{"name": "pwd_1", "content": {"current_working_directory": "/workspace"}},
              {"name": "cd_2", "content": {"error": "cd: 'nope': No such file or directory"}},
              {"name": "nope_3", "content": "Error during execution: name 'nope' is not defined"},
              {"name": "pwd_4", "content": {"current_working_directory": "/workspace"}},
              {"name": "cd_5", "content": "Error during execution: 'int' object has no attribute 'rstrip'"}]
    expected = "\n".join(f"<tool_call>\n{json.dumps(b, ensure_ascii=False)}\n</tool_call>" for b in blocks) + "\n"
    assert out == [{"role": "user", "content": expected}]
    # every call goes to the checker as the authors' does: the unknown name too (a NameError there as well)
    assert env.calls == [[["pwd()", "cd(folder='nope')", "nope()", "pwd()", "cd(folder=5)"]]]
    assert envs.authors_results_text([("a_1", '{"x": "é"}'), ("b_2", "plain"), ("c_3", "[1, 2"), ("d_4", " [1]")]) == (
        '<tool_call>\n{"name": "a_1", "content": {"x": "é"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b_2", "content": "plain"}\n</tool_call>\n'
        '<tool_call>\n{"name": "c_3", "content": "[1, 2"}\n</tool_call>\n'
        '<tool_call>\n{"name": "d_4", "content": [1]}\n</tool_call>\n')


def test_authors_excluded_function_runs_and_is_scored(all_tasks):
    env = authors_env(all_tasks)  # multi_turn_base_0 excludes cp from the friendly tools, not here
    out = env.step('<tool_call>{"name": "cp", "arguments": {"source": "nope.txt", "destination": "x"}}</tool_call>')
    assert '"cp_1"' in out[0]["content"] and "Error during execution" not in out[0]["content"]
    assert env.calls == [[["cp(source='nope.txt', destination='x')"]]]


def test_authors_parser_matches_their_regex():
    """_authors_blocks (linear) finds exactly the groups of the authors' re.finditer on random tag soups."""
    pieces = ["<tool_call>", "</tool_call>", "{", "}", " ", "\n", '"a"', "x", "\\", "<", ">"]
    rng = random.Random(0)
    for _ in range(20000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 16)))
        assert envs._authors_blocks(text) == [m.group(1) for m in envs.AUTHORS_CALL.finditer(text)], text


def test_authors_ground_truth_text_parses_to_the_ground_truth_calls(all_tasks):
    for task in all_tasks:
        env = envs.make_env(task, protocol="authors")
        for turn in range(len(task["turns"])):
            calls, error = envs.parse_calls(env.ground_truth_action(turn), "json", "authors")
            assert error is None and calls == env.ground_truth_calls(turn), (task["id"], turn)


def test_authors_dropping_one_ground_truth_call_gets_zero(all_tasks):
    for task in all_tasks[:12]:
        env = envs.make_env(task, protocol="authors")
        first = next(i for i, gt in enumerate(task["ground_truth"]) if gt)
        for turn in range(len(task["turns"])):
            calls = env.ground_truth_calls(turn)[:-1] if turn == first else env.ground_truth_calls(turn)
            if calls:
                env.step(envs.format_calls(calls, "json"))
            env.step("Done.")
        assert env.done and len(env.calls) == len(task["turns"]) and env.reward() == 0.0, task["id"]


def test_oracle_reads_steps_with_the_protocols_parser(all_tasks):
    task = next(t for t in envs.load_tasks("bfcl", "train") if len(t["ground_truth"][0]) >= 2)
    env = envs.make_env(task, protocol="authors")
    gt = env.ground_truth_calls(0)
    broken = '<tool_call>{"name": "x", "arguments": {</tool_call>'
    assert envs.oracle_feedback(task, [(0, broken)], protocol="authors") == [
        (1, "The request is not done yet. The right call is:\n" + envs.format_calls(gt[:1], "json"))]
    assert envs.oracle_feedback(task, [(0, broken)])[0][1].startswith("Your call could not be run")
    replay = [(turn, env.ground_truth_action(turn)) for turn in range(len(task["turns"]))]
    assert envs.oracle_feedback(task, replay, protocol="authors") == []


# -----------------------------------------------------------------------------
# tasks cut to their first K user turns

def test_load_tasks_cut_to_first_turns(all_tasks):
    for k in (1, 2):
        cut = envs.load_tasks("bfcl", "all", turns=k)
        assert [t["id"] for t in cut] == [t["id"] for t in all_tasks]
        for whole, t in zip(all_tasks, cut):
            if len(whole["turns"]) <= k:
                assert t == whole and "turns_kept" not in t
            else:
                assert t == {**whole, "turns": whole["turns"][:k], "ground_truth": whole["ground_truth"][:k],
                             "turns_kept": k}
    test_ids = [t["id"] for t in envs.load_tasks("bfcl", "test")]
    assert [t["id"] for t in envs.load_tasks("bfcl", "test", turns=1)] == test_ids
    for bad in (0, -1, "2", 1.0, True):
        with pytest.raises(ValueError, match="turns"):
            envs.load_tasks("bfcl", "train", turns=bad)
    with pytest.raises(ValueError, match="--turns applies to BFCL only"):
        envs.load_tasks("appworld", "train", turns=2)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("protocol,action_format", PROTOCOL_FORMATS)
def test_cut_tasks_replay_and_end_after_k_turns(protocol, action_format, k):
    # long tasks whose first k turns all need calls
    tasks = [t for t in envs.load_tasks("bfcl", "train", turns=k)
             if t.get("turns_kept") == k and all(t["ground_truth"][:k])][:6]
    assert len(tasks) == 6
    for task in tasks:
        env = envs.make_env(task, action_format, protocol=protocol)
        assert replay_ground_truth(env) == 1.0, task["id"]
        assert env.turn == k - 1 and len(env.calls) == k and env.done
        # skip the last call of the last kept turn: the checker sees the state of those k turns
        env.reset()
        for turn in range(k):
            calls = env.ground_truth_calls(turn)
            env.step(envs.format_calls(calls[:-1] if turn == k - 1 else calls, action_format) or "Done.")
            if not env.done and env.turn == turn:
                env.step("Done.")
        assert env.done and len(env.calls) == k and env.reward() == 0.0, task["id"]


# -----------------------------------------------------------------------------
# linear-time parsing: hostile input never raises, and gives an error or no calls

HOSTILE = {
    "braces": "{" * 10**6, "brackets": "[" * 10**6, "nested": "[" * 50_000 + "]" * 50_000, "spaces": " " * 10**6,
    "fence spaces": "{" + " " * 10**6 + '"name"', "tags": "<tool_call>" * 90_000, "open tags": "<tool_call>{" * 80_000,
    "empty tags": "<tool_call>{}" * 80_000, "closed empty tags": "<tool_call>{}</tool_call>" * 40_000,
    "deep json": '<tool_call>{"name": "ls", "arguments": ' + "[" * 10**6 + "}</tool_call>",
    "many closers": "[ls(a=True" + "] garbage" * 100_000, "closers": "[cd(folder=" + "]" * 10**6,
    "unclosed string": "[cd(folder='" + "x" * 10**6, "quotes": "[cd(folder=" + '"' * 10**6,
    "triple quotes": "[cd(folder=" + "'''\\" * 250_000, "open calls": "[f(" * 300_000,
}


@pytest.mark.parametrize("protocol,action_format", PROTOCOL_FORMATS)
def test_hostile_inputs_give_an_error_or_no_calls(protocol, action_format):
    for name, text in HOSTILE.items():
        for size in (15_000, 30_000, len(text)):  # under the friendly limit (parsed), over it, 1 MB or so
            calls, error = envs.parse_calls(text[:size], action_format, protocol)
            assert calls == [] and (error is None or isinstance(error, str)), (name, size)
            if protocol == "friendly" and size > envs.MAX_ACTION_CHARS:
                assert error is not None and "over the limit" in error, (name, size)


def test_action_length_limit():
    calls = [("cd", {"folder": "x" * 100})] * 200
    for fmt in envs.ACTION_FORMATS:
        text = envs.format_calls(calls, fmt)
        assert len(text) > envs.MAX_ACTION_CHARS
        assert envs.parse_calls(text, fmt) == ([], f"the reply is {len(text)} characters long, over the limit of "
                                                    f"{envs.MAX_ACTION_CHARS}; a call list is much shorter")
        assert envs.parse_calls(envs.format_calls(calls[:50], fmt), fmt) == (calls[:50], None)
    assert len(envs.parse_calls(envs.format_calls(calls, "json"), "json", "authors")[0]) == 200  # no limit there


def test_python_call_list_end_skips_strings_and_comments():
    cases = {'[cd(folder="a]b"), ls(a=True)]  # done': [("cd", {"folder": "a]b"}), ("ls", {"a": True})],
             "[cd(folder='x'),  # a ] comment\n ls()]": [("cd", {"folder": "x"}), ("ls", {})],
             'Sure: [cd(folder="x")] then [ls()]': [("cd", {"folder": "x"})],
             '[cd(folder="""a]")"""), ls()]': [("cd", {"folder": 'a]")'}), ("ls", {})],
             '[cd(folder="a\\"]\\\\"), ls()]': [("cd", {"folder": 'a"]\\'}), ("ls", {})],
             "[cd(folder=r'a\\']')]": [("cd", {"folder": "a\\']"})],
             "[cd(folder=[1, (2, 3), {'k': ']'}])]": None}  # a tuple is not a plain literal
    for text, want in cases.items():
        calls, error = envs.parse_calls(text, "python")
        assert (calls, error is None) == ((want, True) if want else ([], False)), (text, calls, error)
    for text in ["[cd(folder='x'", "[cd(folder='x)]", "[cd(folder='x') # ]", "[cd(folder=']')"]:
        calls, error = envs.parse_calls(text, "python")
        assert calls == [] and error.startswith("could not parse the call list"), (text, error)
