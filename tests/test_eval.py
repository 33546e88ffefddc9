import json

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
    capsys.readouterr()
    ev.main(["--compare", str(out), str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run | tasks | Avg@k | Best@k |") and len(lines) == 4
    assert lines[2] == lines[3] == "| run | 2 | 0.00 | 0.00 |"
