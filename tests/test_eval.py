import json
import os
import signal
import sys
from pathlib import Path

import pytest

import envs
import eval as ev
import hintsd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_eval(model_dir, out, *extra, limit=1):
    """One tiny eval: 1 rollout per task, 4 new tokens per action, 2 steps."""
    ev.main(["--model", str(model_dir), "--preset", "cpu", "--k", "1", "--limit", str(limit), "--max-new-tokens", "4",
             "--max-env-steps", "2", "--out", str(out), *extra])


def test_avg_and_best_at_k():
    rows = [{"task_id": "a", "category": "x", "reward": r} for r in (1, 0, 0, 0)]
    rows += [{"task_id": "b", "category": "y", "reward": 0.0} for _ in range(4)]
    rows += [{"task_id": "c", "category": "y", "reward": r} for r in (1, 1, 0, 1)]
    s = ev.pass_at_k_summary(rows)
    assert s["overall"]["avg_at_k"] == 100 * 4 / 12 and s["overall"]["best_at_k"] == 100 * 2 / 3
    assert s["x"] == {"tasks": 1, "rollouts": 4, "avg_at_k": 25.0, "best_at_k": 100.0}
    assert s["y"]["best_at_k"] == 50.0 and s["y"]["avg_at_k"] == 100 * 3 / 8


def test_eval_cli_writes_trajectories_and_summary(tiny_qwen, tmp_path, capsys):
    out = tmp_path / "run"
    ev.main(["--model", str(tiny_qwen), "--split", "test", "--k", "2", "--limit", "2", "--max-new-tokens", "5",
             "--max-env-steps", "2", "--out", str(out)])
    lines = [json.loads(x) for x in open(out / "trajectories.jsonl")]
    assert len(lines) == 4 and all({"messages", "tokens", "steps", "reward"} <= set(x) for x in lines)
    s = json.loads((out / "summary.json").read_text())
    assert s["overall"]["rollouts"] == 4 and s["overall"]["tasks"] == 2 and s["k"] == 2
    assert s["bench"] == "bfcl"
    # every resolved setting is saved: the flags given, the rest from the cpu preset (auto on a CPU device)
    cpu = hintsd.PRESETS["cpu"]
    assert s["preset"] == "cpu" and s["max_new_tokens"] == 5 and s["max_env_steps"] == 2 and s["turns"] is None
    assert (s["max_len"], s["action_protocol"], s["temperature"], s["seed"]) == (
        cpu["max_len"], cpu["action_protocol"], cpu["temperature"], cpu["seed"])
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "trajectories.jsonl"]


def test_compare_prints_table_1_layout(tmp_path, capsys):
    def summary(path, bench, avg, best):
        path.mkdir(parents=True)
        (path / "summary.json").write_text(json.dumps(
            {"bench": bench, "k": 4, "overall": {"tasks": 5, "rollouts": 20, "avg_at_k": avg, "best_at_k": best}}))
    summary(tmp_path / "bfcl" / "initial", "bfcl", 10.0, 20.0)
    summary(tmp_path / "bfcl" / "hintsd", "bfcl", 25.0, 40.0)
    summary(tmp_path / "appworld" / "hintsd", "appworld", 5.0, 7.5)
    ev.main(["--compare", *(str(tmp_path / p) for p in ("bfcl/initial", "bfcl/hintsd", "appworld/hintsd"))])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| method | bfcl Avg@k | bfcl Best@k | bfcl tasks x k | appworld Avg@k | appworld Best@k "
                        "| appworld tasks x k |")
    assert lines[2] == "| initial | 10.00 | 20.00 | 5 x 4 | - | - | - |"
    assert lines[3] == "| hintsd | 25.00 | 40.00 | 5 x 4 | 5.00 | 7.50 | 5 x 4 |" and len(lines) == 4
    with pytest.raises(SystemExit) as e:
        ev.main(["--compare", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{tmp_path / 'summary.json'}: no such file" in err and "no usable summary.json" in err


def test_target_steps_reads_target_steps_per_epoch(tmp_path, capsys):
    rows = [{"epoch": 1, "target_steps": [1, 2, 5, 9]}, {"epoch": 1, "target_steps": []},
            {"epoch": 2, "target_steps": [12, 3]}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev.main(["--target-steps", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    name = tmp_path.name
    assert lines[2:] == [f"| {name} | 1 | 4 | 50.0% | 25.0% | 25.0% |", f"| {name} | 2 | 2 | 50.0% | 0.0% | 50.0% |",
                         f"| {name} | all | 6 | 50.0% | 16.7% | 33.3% |"]


def test_efficiency_table_ratios_to_hintsd():
    from bench import efficiency
    row = lambda r, f, u, mem, tok: {"time_rollout": r, "time_feedback": f, "time_update": u,  # noqa: E731
                                     "peak_mem_gb": mem, "tokens_supervised": tok, "rollouts": 2, "failed": 2}
    text = efficiency.table({"hintsd": row(10, 5, 5, 4.0, 100), "sdpo": row(10, 5, 25, 6.0, 400),
                             "grpo": row(10, 0, 0, 2.0, 0)})
    lines = text.splitlines()
    assert lines[2] == "| hintsd | 10.0 | 5.0 | 5.0 | 20.0 | 1.00x | 4.00 | 1.00x | 100 | 1.00x | 0/2 |"
    assert lines[3] == "| sdpo | 10.0 | 5.0 | 25.0 | 40.0 | 2.00x | 6.00 | 1.50x | 400 | 4.00x | 0/2 |"
    assert lines[4].startswith("| grpo | 10.0 | 0.0 | 0.0 | 10.0 | 0.50x | 2.00 | 0.50x | 0 | 0.00x |")


def test_analyzer_bench_scores_the_right_call_not_the_quoted_wrong_one():
    """bench/analyzer.py's oracle_of (the bench's and learn.py's "right function"): the oracle's feedback on a call
    that does not parse quotes that call before the right one; the function scored is the right call's
    (multi_turn_base_158 starts with verify_traveler_information). Before, the quoted call's name was taken."""
    from bench import analyzer
    task = envs.load_tasks("bfcl", "train", 1, ["multi_turn_base_158"])[0]
    broken = '{"name": "authenticate_travel", "arguments": {"client_id": "x"'
    assert envs.oracle_feedback(task, [(0, broken)])[0][1].startswith("Your call could not be run")
    assert analyzer.oracle_of(task, [(0, broken)]) == (0, "verify_traveler_information")
    wrong = '{"name": "authenticate_travel", "arguments": {"client_id": "x"}}'
    assert analyzer.oracle_of(task, [(0, wrong)]) == (0, "verify_traveler_information")
    assert analyzer.oracle_of(task, []) == (None, None)


def test_analyzer_bench_counts_a_target_rescued_by_a_sampled_try_as_kept():
    """bench/analyzer.py's after_replay: verify_targets returns a target rescued by a sampled try as a new Target whose
    feedback quotes the try; the bench keeps it in its rollout's place, quote and all. Before, kept targets were
    matched by identity, so with --verify-samples every rescued target was scored as dropped."""
    from bench import analyzer
    per = [[hintsd.Target(0, 1, "a"), hintsd.Target(0, 2, "b")], [], [hintsd.Target(2, 0, "c")]]
    rescued = hintsd.Target(0, 2, "b" + hintsd.VERIFIED + '{"name": "cd", "arguments": {"folder": "x"}}')
    after = analyzer.after_replay(per, [per[2][0], rescued])
    assert after == [[rescued], [], [per[2][0]]]
    assert after[0][0].feedback.endswith('"cd", "arguments": {"folder": "x"}}')


def test_learn_logs_the_wall_time_of_a_call_stopped_by_kill(tmp_path, monkeypatch):
    """bench/learn.py: a call stopped by kill (SIGTERM) still appends its minutes to minutes.txt, which the summary
    sums over calls; before, a stopped call left no record. The kill lands during the step-0 evaluation."""
    from bench import learn
    monkeypatch.setattr(learn, "evaluate", lambda *a: os.kill(os.getpid(), signal.SIGTERM))
    monkeypatch.setattr(sys, "argv", ["learn.py", "--methods", "grpo", "--out", str(tmp_path)])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stop:
            learn.main()
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert stop.value.code == 143
    minutes = (tmp_path / "grpo" / "minutes.txt").read_text().split()
    assert len(minutes) == 1 and 0 <= float(minutes[0]) < 5
    assert not (tmp_path / "grpo" / "curve.jsonl").exists() and not (tmp_path / "step0.jsonl").exists()


BAD_FLAGS = [
    (["--k", "0"], "argument --k: must be >= 1"),
    (["--k", "two"], "argument --k: expected a whole number"),
    (["--limit", "0"], "argument --limit: must be >= 1"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1"),
    (["--max-len", "0"], "argument --max-len: must be >= 1"),
    (["--max-env-steps", "0"], "argument --max-env-steps: must be >= 1"),
    (["--turns", "0"], "argument --turns: must be >= 1"),
    (["--turns", "runs/hintsd"], "--target-steps RUN_DIR"),  # the old meaning of --turns
    (["--temperature", "-0.5"], "argument --temperature: must be >= 0"),
    (["--temperature", "nan"], "argument --temperature: must be finite"),
    (["--seed", "-1"], "argument --seed: must be >= 0"),
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N"),
    (["--model", "/no/such/model"], "/no/such/model is not a directory"),
    (["--model", "not a model"], "not a Hugging Face id"),
    (["--preset", "gpu"], "argument --preset: invalid choice"),
    (["--action-protocol", "mine"], "argument --action-protocol: invalid choice"),
    (["--bench", "appworld", "--turns", "1"], "--turns cuts BFCL tasks"),
    (["--preset", "paper", "--action-format", "python"], "--action-format python needs --action-protocol friendly"),
    (["--plot-out", "figs"], "--plot-out goes with --plot"),
    (["--compare", "a", "--plot", "b"], "not allowed with argument"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_exits_2_before_any_work(flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        ev.main([*flags, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert not out.exists()  # rejected before the output dir (or anything else) was touched


def test_non_empty_out_dir_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "summary.json").write_text('{"overall": "old"}')
    (out / "trajectories.jsonl").write_text('{"old": 1}\n')
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    with pytest.raises(SystemExit) as e:
        ev.main(["--out", str(out), "--limit", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--out {out} is not empty" in err and "--overwrite" in err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before


def test_overwrite_replaces_results_atomically(tiny_qwen, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_eval(tiny_qwen, out)
    real_rollout, real_replace = hintsd.rollout, os.replace
    seen, replaced = [], []

    def spy(*args, **kw):  # the run dir as the new rollouts start
        seen.append(sorted(p.name for p in out.iterdir()))
        return real_rollout(*args, **kw)

    monkeypatch.setattr(hintsd, "rollout", spy)
    monkeypatch.setattr(ev.os, "replace", lambda src, dst: (replaced.append(Path(dst).name), real_replace(src, dst)))
    run_eval(tiny_qwen, out, "--k", "2", "--overwrite")
    # the old summary is gone before new trajectories are written; the old trajectories stay until replaced
    assert seen == [["trajectories.jsonl", "trajectories.jsonl.tmp"]]
    assert replaced == ["trajectories.jsonl", "summary.json"]  # the summary last
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "trajectories.jsonl"]
    assert len(open(out / "trajectories.jsonl").readlines()) == 2
    assert json.loads((out / "summary.json").read_text())["k"] == 2


def test_interrupted_eval_leaves_no_summary(tiny_qwen, tmp_path, monkeypatch, capsys):
    out, real, calls = tmp_path / "run", hintsd.rollout, []

    def interrupted_after_first_task(*args, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("simulated interruption")
        return real(*args, **kw)

    monkeypatch.setattr(hintsd, "rollout", interrupted_after_first_task)
    with pytest.raises(RuntimeError, match="simulated"):
        run_eval(tiny_qwen, out, limit=2)
    assert not (out / "summary.json").exists() and not (out / "trajectories.jsonl").exists()
    assert len(open(out / "trajectories.jsonl.tmp").readlines()) == 1  # the finished task's rollout is kept aside
    assert "no summary.json written" in capsys.readouterr().err


def test_turns_cuts_tasks_and_is_recorded(tiny_qwen, tmp_path, monkeypatch):
    import envs
    out, real, played = tmp_path / "run", envs.make_env, []
    monkeypatch.setattr(envs, "make_env", lambda task, *a, **kw: (played.append(task), real(task, *a, **kw))[1])
    run_eval(tiny_qwen, out, "--turns", "1")
    s = json.loads((out / "summary.json").read_text())
    assert s["turns"] == 1 and s["overall"]["tasks"] == 1
    assert len(played) == 1 and len(played[0]["turns"]) == 1  # the env got the task cut to its first user turn


def test_compare_skips_malformed_summaries(tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    (good / "summary.json").write_text(json.dumps(
        {"bench": "bfcl", "k": 2, "overall": {"tasks": 3, "rollouts": 6, "avg_at_k": 50.0, "best_at_k": 66.7}}))
    bad = {"empty": "", "not_dict": "[1, 2]", "no_overall": '{"bench": "bfcl", "k": 4}', "half": '{"overall": {"av'}
    for name, text in bad.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(text)
    (tmp_path / "no_file").mkdir()
    names = ["empty", "good", *list(bad)[1:], "no_file"]
    ev.main(["--compare", *(str(tmp_path / n) for n in names)])
    out, err = capsys.readouterr()
    assert out.splitlines()[2:] == ["| good | 50.00 | 66.70 | 3 x 2 |"]
    assert all(str(tmp_path / n / "summary.json") in err for n in [*bad, "no_file"]) and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        ev.main(["--compare", *(str(tmp_path / n) for n in [*bad, "no_file"])])
    assert e.value.code == 2 and "no usable summary.json" in capsys.readouterr().err


def test_target_steps_skips_malformed_lines_and_files(tmp_path, capsys):
    run, empty = tmp_path / "run", tmp_path / "empty"
    run.mkdir()
    empty.mkdir()
    rows = [{"epoch": 1, "target_steps": [1, 5]}, {"epoch": "one", "target_steps": [9]}, {"epoch": 1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 2, "target_st')
    ev.main(["--target-steps", str(empty), str(run)])
    out, err = capsys.readouterr()
    assert out.splitlines()[2:] == ["| run | 1 | 2 | 50.0% | 50.0% | 0.0% |",
                                    "| run | all | 2 | 50.0% | 50.0% | 0.0% |"]
    assert f"{empty / 'metrics.jsonl'}: no such file" in err
    assert f"{run / 'metrics.jsonl'}:2:" in err and f"{run / 'metrics.jsonl'}:4: not valid JSON" in err
    with pytest.raises(SystemExit) as e:
        ev.main(["--target-steps", str(empty)])
    assert e.value.code == 2 and "no usable metrics.jsonl" in capsys.readouterr().err


def write_jsonl(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_plot_writes_three_small_pngs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --plot-out is plots/ in the current directory
    hint, grpo = tmp_path / "hintsd", tmp_path / "grpo"
    hint.mkdir()
    grpo.mkdir()
    write_jsonl(hint / "metrics.jsonl", [
        {"step": s, "method": "hintsd", "success_rate": 0.25 * s, "kl": 1.0 / s, "kl_after": 0.5 / s,
         "target_steps": [1, 2, 4 * s, 9 + s]} for s in (1, 2, 3)], tail='{"step": 4, "meth')
    write_jsonl(hint / "curve.jsonl", [
        *({"step": s, "set": "trained", "successes": s, "rollouts": 4} for s in (0, 2, 4)),
        *({"step": s, "set": "held-out", "successes": s // 2, "rollouts": 4} for s in (0, 2, 4)),
        {"step": 6, "set": "trained", "successes": "x", "rollouts": 4}])
    write_jsonl(grpo / "metrics.jsonl", [{"step": s, "method": "grpo", "success_rate": 0.5} for s in (1, 2)])
    (tmp_path / "summary.md").write_text("| method |\n")  # what `--plot runs/learn/*` also matches: skipped silently
    ev.main(["--plot", str(hint), str(grpo), str(tmp_path / "summary.md")])
    out, err = capsys.readouterr()
    names = ("success.png", "kl.png", "target_steps.png")
    assert out.splitlines() == [str(Path("plots") / n) for n in names]  # default: plots/ in the current directory
    assert "summary.md" not in err
    for n in names:
        data = (tmp_path / "plots" / n).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) < 500_000
    assert f"{hint / 'metrics.jsonl'}:4: not valid JSON" in err and f"{hint / 'curve.jsonl'}:7:" in err

    # no run with a curve.jsonl: the training success rate instead; --plot-out elsewhere
    ev.main(["--plot", str(grpo), str(tmp_path / "missing"), "--plot-out", str(tmp_path / "figs")])
    out, err = capsys.readouterr()
    assert out.splitlines() == [str(tmp_path / "figs" / n) for n in names]
    assert all((tmp_path / "figs" / n).read_bytes().startswith(PNG_MAGIC) for n in names)
    assert f"{tmp_path / 'missing'}: no usable metrics.jsonl or curve.jsonl" in err
    with pytest.raises(SystemExit) as e:
        ev.main(["--plot", str(tmp_path / "missing")])
    assert e.value.code == 2 and "--plot: no usable" in capsys.readouterr().err


def test_tasks_flag_selects_ids_and_refuses_unknown_ones(tiny_qwen, tmp_path, capsys):
    out = tmp_path / "run"
    ev.main(["--model", str(tiny_qwen), "--preset", "cpu", "--split", "train", "--tasks", "multi_turn_base_93",
             "--k", "1", "--max-new-tokens", "4", "--max-env-steps", "2", "--out", str(out)])
    assert [json.loads(x)["task_id"] for x in open(out / "trajectories.jsonl")] == ["multi_turn_base_93"]
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", str(tiny_qwen), "--split", "train", "--tasks", "nope", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "not in the bfcl train split: ['nope']" in capsys.readouterr().err
