"""The READMEs' commands against the programs' --help and the Makefile (bench/docs_check.py)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import docs_check  # noqa: E402


def test_readme_commands_match_the_programs():
    # a process of its own: the check runs every program's --help in-process (torch imported once, a few seconds)
    r = subprocess.run([sys.executable, "bench/docs_check.py"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_docs_check_reports_each_problem(tmp_path, monkeypatch):
    monkeypatch.setitem(docs_check._HELP, "eval.py", {"--k", "--plot", "--plot-out"})  # no --help run here
    monkeypatch.setitem(docs_check._HELP, "hintsd.py", {"--steps", "--model"})
    doc = tmp_path / "doc.md"
    doc.write_text("Run `python eval.py --k 2 --turns-of RUN`, then\n\n```bash\n"
                   "make run nosuch PINS=   # a comment --not-a-flag\n"
                   "python bench/nosuch.py --x\n"
                   "GPU=.gpu bash bench/nosuch.sh\n"
                   "torchrun --nproc_per_node=2 hintsd.py --steps 2 \\\n  --stepz 3\n"
                   "```\n")
    problems = docs_check.check([str(doc)])
    assert [p.split(": ", 1)[0] for p in problems] == [f"{doc}:{n}" for n in (1, 4, 5, 6, 7)]
    assert "--turns-of is not a flag of eval.py" in problems[0]
    assert "no make target 'nosuch'" in problems[1] and "run'" not in problems[1]
    assert "bench/nosuch.py is not a file" in problems[2] and "bench/nosuch.sh is not a file" in problems[3]
    assert "--stepz is not a flag of hintsd.py" in problems[4] and len(problems) == 5


def test_docs_check_counts_only_tracked_files(tmp_path, monkeypatch):
    # a program present on disk but not tracked by git fails here as it would in a clean clone; .gpu/ is skipped
    assert "bench/step.py" in docs_check.repo_files() and (ROOT / "bench/step.py").is_file()
    monkeypatch.setattr(docs_check, "repo_files", lambda: {"Makefile"})
    doc = tmp_path / "doc.md"
    doc.write_text("```bash\npython bench/step.py\npython3 .gpu/hf_static.py .gpu/qwen3-4b static 8\n```\n")
    assert docs_check.check([str(doc)]) == [f"{doc}:2: `python bench/step.py`: bench/step.py is not a file of the repo"]


def test_docs_check_parses_commands():
    assert docs_check.parse("python bench/learn.py --steps 2 -- --lr 1e-4") == [
        ("py", "bench/learn.py", [("bench/learn.py", "--steps"), ("hintsd.py", "--lr")])]
    assert docs_check.parse("cd x && .venv/bin/python eval.py --plot=a") == [("py", "eval.py", [("eval.py", "--plot")])]
    assert docs_check.parse("python -m pytest -q tests") == []
    assert docs_check.parse("--topk exact --loss-norm token") == [("flags", None, [(None, "--topk"),
                                                                                   (None, "--loss-norm")])]


def test_gpu_check_names_what_is_missing(tmp_path):
    # bench/gpu.sh stops before any work, with one line naming the missing input (README's GPU check)
    def run(gpu):
        r = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin", "GPU": str(gpu), "OUT": str(tmp_path / "out")})
        return r.returncode, r.stdout, r.stderr.strip().splitlines()
    assert run(tmp_path / "none") == (2, "", [f"bench/gpu.sh: no folder {tmp_path / 'none'} (set GPU=DIR, the folder "
                                              "with qwen3-4b/: see bench/README.md#the-gpu-check)"])
    (tmp_path / "gpu" / "qwen3-4b").mkdir(parents=True)
    (tmp_path / "gpu" / "qwen3-4b" / "config.json").write_text("{}")
    rc, out, err = run(tmp_path / "gpu")
    assert rc == 2 and out == "" and len(err) == 1 and "missing" in err[0] and "qwen3-4b/tokenizer.json" in err[0]
    assert not (tmp_path / "out").exists()
