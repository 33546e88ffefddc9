"""Real torch.distributed processes (torchrun, gloo, CPU): two processes give what one process gives on the same
global batch (HINT-SD, GRPO, full fine-tuning under FSDP2), resume exactly, and shard eval.py's tasks."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--preset", "cpu", "--feedback", "oracle", "--tasks", "multi_turn_base_105", "multi_turn_base_115",
          "--tasks-per-step", "2", "--rollouts", "2", "--max-new-tokens", "6", "--max-env-steps", "3",
          "--lora-rank", "4", "--lr", "1e-2", "--ema-rate", "0.5", "--temperature", "1.0", "--no-after-check"]
PORT = [29600 + os.getpid() % 300]


def launch(nproc: int, script: str, args: list[str], timeout: int = 240) -> str:
    """Run `script args` under torchrun with nproc processes (nproc 0: plain python); the whole process group is
    killed on a timeout or a failure."""
    PORT[0] += 1
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={PORT[0]}"]
           if nproc else [sys.executable]) + [script, *args]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        raise AssertionError(f"timed out:\n{out[-4000:]}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, out[-4000:]
    return out


def ckpt(run: Path, step: int) -> dict:
    return torch.load(run / f"ckpt-{step:06d}" / "state.pt", weights_only=True)


def close(a: list, b: list, tol: float = 1e-5) -> bool:
    return all((x - y).abs().max() <= tol * max(1.0, float(y.abs().max())) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def runs(tiny_qwen, tmp_path_factory):
    """One process 1 step; two processes 2 steps; two processes 1 step then resumed to 2."""
    d = tmp_path_factory.mktemp("ddp")
    model = ["--model", str(tiny_qwen)]
    launch(0, "hintsd.py", COMMON + model + ["--steps", "1", "--out", str(d / "one")])
    launch(2, "hintsd.py", COMMON + model + ["--steps", "2", "--out", str(d / "two")])
    launch(2, "hintsd.py", COMMON + model + ["--steps", "1", "--out", str(d / "resumed")])
    launch(2, "hintsd.py", COMMON + model + ["--steps", "2", "--resume", "--out", str(d / "resumed")])
    return d


def test_two_processes_take_the_same_step_as_one(runs):
    one, two = ckpt(runs / "one", 1), ckpt(runs / "two", 1)
    assert close(one["params"], two["params"]) and close(one["shadows"]["ema"], two["shadows"]["ema"])
    assert any(p.abs().sum() > 0 for p in two["params"][1::2])  # the step moved the B matrices
    states = lambda s: [s["opt"]["state"][i]["exp_avg_sq"] for i in sorted(s["opt"]["state"])]  # noqa: E731
    assert close(states(one), states(two))
    # the same rollouts (each seeded by its task and index, not by the rank that played it) and metrics
    r1, r2 = (json.loads(open(runs / r / "rollouts.jsonl").readline()) for r in ("one", "two"))
    assert [r["tokens"] for r in r1["rollouts"]] == [r["tokens"] for r in r2["rollouts"]]
    m1, m2 = (json.loads(open(runs / r / "metrics.jsonl").readline()) for r in ("one", "two"))
    assert m1["tokens_supervised"] == m2["tokens_supervised"] and m1["targets"] == m2["targets"] > 0
    assert abs(m1["kl"] - m2["kl"]) < 1e-6 and m1["rollouts"] == m2["rollouts"] == 4


def test_a_two_process_run_resumes_bit_identically(runs):
    a, b = ckpt(runs / "two", 2), ckpt(runs / "resumed", 2)
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    assert all(torch.equal(x, y) for x, y in zip(a["shadows"]["ema"], b["shadows"]["ema"]))
    assert [json.loads(x)["step"] for x in open(runs / "resumed" / "metrics.jsonl")] == [1, 2]
    assert len(b["rng"]) == 2  # each rank's random state


def test_a_lora_checkpoint_loads_under_another_world_size(runs, tiny_qwen):
    out = launch(0, "hintsd.py", COMMON + ["--model", str(tiny_qwen), "--steps", "3", "--resume", "--out",
                                           str(runs / "two")])
    assert "written by 2 process(es), this run has 1" in out
    assert [json.loads(x)["step"] for x in open(runs / "two" / "metrics.jsonl")] == [1, 2, 3]


DRIVER = """import sys
import hintsd
hintsd.group_advantages = lambda rewards, group: [1.0, -1.0] * (len(rewards) // 2)  # a signal without successes
hintsd.main(sys.argv[1:])
"""


def test_grpo_two_processes_take_the_same_step_as_one(tiny_qwen, tmp_path):
    (tmp_path / "driver.py").write_text(DRIVER)
    args = COMMON + ["--model", str(tiny_qwen), "--method", "grpo", "--steps", "1"]
    launch(0, str(tmp_path / "driver.py"), args + ["--out", str(tmp_path / "one")])
    launch(2, str(tmp_path / "driver.py"), args + ["--out", str(tmp_path / "two")])
    one, two = ckpt(tmp_path / "one", 1), ckpt(tmp_path / "two", 1)
    assert close(one["params"], two["params"]) and any(p.abs().sum() > 0 for p in two["params"][1::2])
    m = [json.loads(open(tmp_path / r / "metrics.jsonl").readline()) for r in ("one", "two")]
    assert m[0]["pg_loss"] == pytest.approx(m[1]["pg_loss"], abs=1e-6) and m[0]["tokens_supervised"] > 0


def test_full_finetuning_under_fsdp2_takes_the_same_step_as_one_process(tiny_qwen, tmp_path):
    args = COMMON + ["--model", str(tiny_qwen), "--method", "sft", "--lr", "1e-3", "--steps", "1"]
    args[args.index("--lora-rank") + 1] = "0"  # every weight trained: FSDP2 under two processes
    # (SFT on the tasks' ground-truth replays: gradients far above AdamW's eps, so the comparison is well posed)
    launch(0, "hintsd.py", args + ["--out", str(tmp_path / "one")])
    launch(2, "hintsd.py", args + ["--out", str(tmp_path / "two")])
    one, two = ckpt(tmp_path / "one", 1), ckpt(tmp_path / "two", 1)
    assert len(one["params"]) == len(two["params"]) > 20 and close(one["params"], two["params"], 1e-4)
    assert close(one["shadows"]["ema"], two["shadows"]["ema"], 1e-4)


def test_eval_sharded_over_two_processes_gives_the_same_rows(tiny_qwen, tmp_path):
    args = ["--model", str(tiny_qwen), "--preset", "cpu", "--split", "test", "--limit", "3", "--k", "2",
            "--max-new-tokens", "5", "--max-env-steps", "2", "--temperature", "1.0"]
    launch(0, "eval.py", args + ["--out", str(tmp_path / "one")])
    launch(2, "eval.py", args + ["--out", str(tmp_path / "two")])
    s1, s2 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    assert s1["overall"] == s2["overall"] and s2["processes"] == 2 and s1["overall"]["rollouts"] == 6
    t1, t2 = ([json.loads(x) for x in open(tmp_path / r / "trajectories.jsonl")] for r in ("one", "two"))
    assert [(t["task_id"], t["tokens"]) for t in t1] == [(t["task_id"], t["tokens"]) for t in t2]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["summary.json", "trajectories.jsonl"]
