"""BFCL multi-turn environment: split, fidelity against the official checker, malformed input, safety."""
import os
import time

import pytest
from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils

import envs

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
        assert not any(m["content"].startswith("Error:") for m in out), (env.task["id"], env.turn, out)
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

@pytest.mark.parametrize("action_format", envs.ACTION_FORMATS)
def test_ground_truth_replay_gets_full_reward(all_tasks, action_format):
    t0 = time.time()
    rewards = {t["id"]: replay_ground_truth(envs.make_env(t, action_format)) for t in all_tasks}
    failed = [tid for tid, r in rewards.items() if r != 1.0]
    print(f"\n{action_format}: {len(rewards) - len(failed)}/{len(rewards)} ground-truth replays valid "
          f"in {time.time() - t0:.1f}s")
    assert len(rewards) == 400 and not failed, failed[:10]


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


def test_episode_cut_short_gets_zero(all_tasks):
    task = next(t for t in all_tasks if len(t["turns"]) >= 3)
    env = envs.make_env(task, max_steps=2)
    env.reset()
    env.step(env.ground_truth_action(0))
    assert env.step("Done.") == [] and env.done and env.turn == 0  # cap reached: no next user turn
    assert env.reward() == 0.0
    assert env.step("anything") == [] and env.steps == 2  # stepping a finished episode is a no-op


# -----------------------------------------------------------------------------
# parsing, malformed input, safety

def test_parse_format_roundtrip():
    calls = [("cd", {"folder": "a 'b' \"c\""}), ("mean", {"numbers": [1, 2.5, -3]}), ("ls", {}),
             ("post", {"tags": ["#x"], "meta": {"k": None, "b": True}})]
    for fmt in envs.ACTION_FORMATS:
        assert envs.parse_calls(envs.format_calls(calls, fmt), fmt) == (calls, None)
    assert envs.parse_calls('Sure.\n```python\n[cd(folder="x")]\n```\nDone', "python") == ([("cd", {"folder": "x"})], None)
    assert envs.parse_calls('<tool_call>  {"name": "ls", "arguments": "{\\"a\\": true}"} \n', "json") == ([("ls", {"a": True})], None)
    for fmt in envs.ACTION_FORMATS:
        assert envs.parse_calls("All done, the file is moved.", fmt) == ([], None)
    assert envs.parse_calls("[]", "python") == ([], None)


MALFORMED = {
    "json": ['<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
             '<tool_call>{"name": "ls", "arguments": {"bogus": 1}}</tool_call>',
             '<tool_call>{"name": "ls", "arguments": {"a": tru</tool_call>',
             '<tool_call>{"name": "ls", "arguments": {"a=1),__import__(\'os\').system(\'x\'),ls(a": 1}}</tool_call>',
             '<tool_call>["ls"]</tool_call>'],
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
    assert envs.oracle_feedback(task, [(0, good), (0, bad)]) == [
        (2, f"You should call {envs.call_to_str(*gt[1])} instead of definitely_wrong().")]
    assert envs.oracle_feedback(task, [(0, "I am done.")])[0][0] == 1
    replay = [(turn, env.ground_truth_action(turn)) for turn in range(len(task["turns"]))]
    assert envs.oracle_feedback(task, replay) == []


def test_python_format_gives_the_template_no_tools_and_lists_docs_itself():
    task = envs.load_tasks("bfcl", "test")[0]
    env = envs.make_env(task, action_format="python")
    system = env.reset()[0]["content"]
    assert env.tools == [] and len(env.schemas) == len(envs.make_env(task).tools)
    assert all(t["function"]["name"] in system for t in env.schemas) and "[func_a(x=1)" in system
