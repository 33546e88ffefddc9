"""AppWorld environment against the real engine, on the offline tasks of bench/appworld_tasks.py.

The engine tests are skipped when the AppWorld venv is absent (`make setup-appworld` builds it)."""
import pytest

import envs
from bench.appworld_tasks import SUPERVISOR, TASKS

needs_appworld = pytest.mark.skipif(not envs.appworld_available(),
                                    reason="AppWorld venv absent: run `make setup-appworld`")
BY_ID = {t["id"]: t for t in TASKS}


def fenced(code):
    return f"I will run this.\n```python\n{code}\n```"


def test_missing_appworld_says_how_to_install_and_get_data(monkeypatch):
    monkeypatch.setattr(envs, "APPWORLD_PYTHON", "/nonexistent/bin/python")
    for call in (lambda: envs.load_tasks("appworld", "train"),
                 lambda: envs.make_env({"id": "x_1", "bench": "appworld", "root": "/tmp"})):
        with pytest.raises(RuntimeError, match="make setup-appworld") as e:
            call()
        assert "appworld download data" in str(e.value)


def test_unknown_split():
    with pytest.raises(ValueError, match="test_normal"):
        envs.load_tasks("appworld", "validation")


def test_extract_code_and_clip():
    assert envs.extract_code("x = 1") == "x = 1"
    assert envs.extract_code("Plan.\n```python\na = 1\n```\nthen\n```\nb = 2\n```") == "a = 1\nb = 2"
    assert envs.extract_code("```python\nprint(3)") == "print(3)"  # cut off before the closing fence
    assert envs.extract_code("Install it:\n```bash\npip install x\n```\nThen it works.") == ""  # no python
    clipped = envs.clip_output("a" * 50 + "b" * 50, limit=20)
    assert clipped.startswith("a" * 10) and clipped.endswith("b" * 10) and "80 characters cut" in clipped


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    if not envs.appworld_available():
        pytest.skip("AppWorld venv absent: run `make setup-appworld`")
    with pytest.MonkeyPatch.context() as mp:  # an empty root: the offline tasks even where real data exists
        mp.setenv("APPWORLD_ROOT", str(tmp_path_factory.mktemp("no_appworld_data")))
        return envs.load_tasks("appworld", "train")


@needs_appworld
def test_offline_tasks_and_splits(tasks):
    assert [t["id"] for t in tasks] == [t["id"] for t in TASKS]
    assert {t["bench"] for t in tasks} == {"appworld"} and tasks[2]["category"] == "difficulty_2"
    assert [t["split"] for t in envs.load_appworld_tasks("test")] == ["test_normal"] * 3  # same offline root
    assert len(envs.load_appworld_tasks("all")) == 12


@needs_appworld
def test_ground_truth_gets_1_and_wrong_code_gets_0(tasks):
    for task in tasks:
        env = envs.make_env(task)
        assert env.tools == [] and env.max_steps == envs.APPWORLD_MAX_STEPS
        for code, want in ((BY_ID[task["id"]]["solution"], 1.0), (BY_ID[task["id"]]["wrong"], 0.0)):
            system, user = env.reset()
            assert "apis.supervisor.complete_task" in system["content"]
            assert BY_ID[task["id"]]["instruction"] in user["content"] and SUPERVISOR["email"] in user["content"]
            out = env.step(fenced(code))
            assert env.done and out[0]["role"] == "tool" and "Execution successful" in out[0]["content"]
            assert env.reward() == want, (task["id"], env.evaluation)
            assert env.proc is None  # evaluated and closed as soon as the episode ended
        assert env.evaluation["failures"] and env.step("print(1)") == []


@needs_appworld
def test_errors_are_observations_and_step_cap(tasks):
    env = envs.make_env(tasks[0], max_steps=6)
    env.reset()
    observe = lambda text: env.step(text)[0]["content"]
    assert "ZeroDivisionError" in observe("print(1/0)") and not env.done
    assert "Syntax error" in observe("```python\nx = (\n```")
    assert "not allowed" in observe("import os\nprint(os.listdir('.'))")  # AppWorld's own sandbox
    out = observe("print('a' * 10000)")
    assert "characters cut" in out and len(out) < envs.APPWORLD_MAX_OUTPUT + 100
    assert "42" not in observe("x = 41")
    assert "42" in observe("print(x + 1)") and env.done  # state persists across steps; 6 steps: capped
    assert env.reward() == 0.0 and env.step("print(1)") == []


@needs_appworld
def test_unfinished_episode_is_not_evaluated(tasks):
    """The authors' appworld_env.step: reward = evaluate(...) only once world.task_completed(), else 0. Here the
    note is created as asked (AppWorld's tests pass on that state) but the task is never marked complete: 0."""
    task = next(t for t in tasks if t["id"] == "notecreate_1")
    env = envs.make_env(task, max_steps=2)
    env.reset()
    env.step(fenced(BY_ID["notecreate_1"]["solution"].replace("apis.supervisor.complete_task()", "")))
    assert env._call("evaluate")["success"] and not env.done
    env.step("print(1)")
    assert env.done and not env.completed and env.reward() == 0.0 and env.proc is None


@needs_appworld
def test_infinite_loop_times_out(tasks):
    env = envs.AppWorldEnv(tasks[0], timeout=1)
    env.reset()
    assert "timed out" in env.step("while True:\n    pass")[0]["content"]
    env.close()


@needs_appworld
def test_eval_and_training_cli_run_on_the_offline_tasks(tiny_qwen, tmp_path, capsys):
    """`eval.py --bench appworld` and `hintsd.py --bench appworld` drive the real engine end to end (tiny model)."""
    import json

    import eval as ev
    import hintsd
    ev.main(["--bench", "appworld", "--model", str(tiny_qwen), "--split", "test", "--k", "1", "--limit", "1",
             "--max-new-tokens", "8", "--max-env-steps", "2", "--out", str(tmp_path / "eval")])
    rows = [json.loads(x) for x in open(tmp_path / "eval" / "trajectories.jsonl")]
    assert len(rows) == 1 and rows[0]["reward"] == 0.0 and len(rows[0]["steps"]) == 2
    assert any(m["role"] == "tool" for m in rows[0]["messages"])  # the code's output came back
    hintsd.main(["--bench", "appworld", "--model", str(tiny_qwen), "--feedback", "env", "--steps", "1",
                 "--rollouts", "1", "--limit", "1", "--max-new-tokens", "8", "--max-env-steps", "2",
                 "--lora-rank", "4", "--out", str(tmp_path / "train")])
    row = json.loads(open(tmp_path / "train" / "metrics.jsonl").readline())
    assert row["failed"] == 1 and row["targets"] >= 1 and row["tokens_supervised"] > 0
