import json

import pytest

import eval as ev


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
    with pytest.raises(SystemExit, match="no summary.json"):
        ev.main(["--compare", str(tmp_path)])


def test_turns_reads_target_steps_per_epoch(tmp_path, capsys):
    rows = [{"epoch": 1, "target_steps": [1, 2, 5, 9]}, {"epoch": 1, "target_steps": []},
            {"epoch": 2, "target_steps": [12, 3]}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev.main(["--turns", str(tmp_path)])
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
