"""Checks the commands written in README.md and bench/README.md against the programs they call.

    python bench/docs_check.py [FILE.md ...]        # default: README.md bench/README.md
    python bench/docs_check.py --list               # also print every command it found

Commands are read from fenced code blocks (one per line, `\\` continuations joined, `# comments` dropped) and from
inline code spans. A command is `python|python3|.venv/bin/python PROG.py ...`, `torchrun [its options] PROG.py ...`,
`bench/X.py ...` written bare, `make TARGET...` or `bash X.sh` (leading VAR=value assignments allowed). For each:
  - PROG must be a file of the repo, and every `--flag` (up to an `=`) must appear in `PROG --help`; after a lone
    `--` (bench/efficiency.py, bench/learn.py pass the rest on to hintsd.py) flags are checked against hintsd.py;
  - every make target must be a target of the Makefile; a bash script must exist.
"A file of the repo" means tracked by git (`git ls-files`), so an ignored local copy cannot pass here and fail in CI.
Programs under `.gpu/` are skipped: that folder is the GPU machine's copy of ../shared/gpu (bench/README.md), never
part of a clone.
An inline code span that starts with a flag (`--topk exact`) must name flags some documented program has.
Each program's --help is read once, all in this one process (torch is imported once). Prints one line per problem
(FILE:LINE: command: what is wrong) and exits 1 if there is any, else prints a one-line summary and exits 0.
"""
import argparse
import contextlib
import io
import re
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "bench/README.md"]
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv-appworld/bin/python"}
FLAG = re.compile(r"--[A-Za-z][\w-]*")
SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.S)  # an inline code span: a run of backticks to the same run
SEPARATORS = re.compile(r"\s(?:&&|\|\||;|\|)\s")


def commands(text: str):
    """(line number, command text) of every candidate: fenced lines, then inline spans of the prose."""
    out, prose, fence = [], [], None
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line
            prose.append("")
            i += 1
            continue
        if fence is not None:
            start, cmd = i + 1, line
            while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd.rstrip()[:-1] + " " + lines[i]
            cmd = re.split(r"(?:^|\s)#", cmd, maxsplit=1)[0]
            if cmd.strip():
                out.append((start, cmd.strip()))
            prose.append("")
        else:
            prose.append(line)
        i += 1
    body = "\n".join(prose)
    for m in SPAN.finditer(body):
        out.append((body.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split())))
    return sorted(out)


def parse(cmd: str):
    """[(kind, name, flags)] of the commands in one text: kind 'py' (name = program path), 'make' (name = targets),
    'sh' (name = script), or 'flags' (a span of bare flags)."""
    found = []
    if cmd.startswith("--"):
        return [("flags", None, [(None, f) for f in FLAG.findall(cmd)])]
    for seg in SEPARATORS.split(f" {cmd} "):
        toks = [t.strip("[](),") for t in seg.split()]
        toks = [t for t in toks if t]
        while toks and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", toks[0]):  # VAR=value before the command
            toks.pop(0)
        if not toks:
            continue
        head, prog, rest = toks[0], None, []
        if head in PYTHONS or head.endswith("/bin/python"):
            if len(toks) > 1 and toks[1].endswith(".py"):
                prog, rest = toks[1], toks[2:]
        elif head == "torchrun":
            at = next((k for k, t in enumerate(toks) if t.endswith(".py")), None)
            if at is not None:
                prog, rest = toks[at], toks[at + 1:]
        elif re.fullmatch(r"(?:bench/)?\w+\.py", head) and (head.startswith("bench/") or head in ("hintsd.py",
                                                                                                    "eval.py")):
            prog, rest = head, toks[1:]
        elif head == "make":
            found.append(("make", [t for t in toks[1:] if "=" not in t and not t.startswith("-")], []))
        elif head == "bash" and len(toks) > 1 and toks[1].endswith(".sh"):
            found.append(("sh", toks[1], []))
        if prog is None:
            continue
        flags, owner = [], prog
        for t in rest:
            if t == "--":
                owner = "hintsd.py"
            elif t.startswith("--") and FLAG.match(t):
                flags.append((owner, FLAG.match(t).group(0)))
        found.append(("py", prog, flags))
    return found


_HELP: dict = {}


def help_flags(prog: str):
    """The flags in PROG --help (read once, in this process), or an error text."""
    if prog not in _HELP:
        buf, argv, path = io.StringIO(), sys.argv, list(sys.path)
        sys.argv = [str(ROOT / prog), "--help"]
        sys.path.insert(0, str((ROOT / prog).parent))
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                runpy.run_path(str(ROOT / prog), run_name="__main__")
        except SystemExit as e:
            if isinstance(e.code, str):
                buf.write(e.code)
        except Exception as e:  # noqa: BLE001 -- reported as a problem
            _HELP[prog] = f"`{prog} --help` failed: {type(e).__name__}: {e}"
        finally:
            sys.argv, sys.path[:] = argv, path
        if prog not in _HELP:
            text = buf.getvalue()
            _HELP[prog] = set(FLAG.findall(text)) if "usage:" in text else text
    return _HELP[prog]


def repo_files() -> set | None:
    """Paths git tracks (relative to ROOT), or None outside a git checkout (then any file on disk counts)."""
    try:
        r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(r.stdout.split("\0")) - {""}


def makefile_targets() -> set:
    text = (ROOT / "Makefile").read_text()
    targets = set()
    for m in re.finditer(r"^([A-Za-z0-9_.-][A-Za-z0-9_. -]*?)\s*:(?!=)", text, re.M):
        targets.update(m.group(1).split())
    return targets - {".PHONY"}


def check(files: list[str], show: bool = False) -> list[str]:
    problems, bare = [], []
    targets, tracked = makefile_targets(), repo_files()

    def in_repo(path: str) -> bool:
        return path in tracked if tracked is not None else (ROOT / path).is_file()

    for name in files:
        for line, cmd in commands((ROOT / name).read_text()):
            for kind, what, flags in parse(cmd):
                if show:
                    print(f"{name}:{line}: {kind} {what} {' '.join(f for _, f in flags)}")
                where = f"{name}:{line}: `{cmd if len(cmd) < 90 else cmd[:87] + '...'}`"
                if kind == "make":
                    problems += [f"{where}: no make target {t!r} in the Makefile" for t in what if t not in targets]
                elif kind == "flags":
                    bare.append((where, [f for _, f in flags]))
                elif what.startswith(".gpu/"):  # a program or script of the GPU folder: not in a clone
                    continue
                elif not in_repo(what):
                    problems.append(f"{where}: {what} is not a file of the repo")
                elif kind == "py":
                    for owner, flag in flags:
                        known = help_flags(owner)
                        if isinstance(known, str):
                            problems.append(f"{where}: {owner} has no argparse --help to check {flag} against")
                        elif flag not in known:
                            problems.append(f"{where}: {flag} is not a flag of {owner}")
    if not bare:
        return problems
    scripts = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.py"))
    programs = [p for p in ["hintsd.py", "eval.py", *scripts] if in_repo(p)]  # untracked: absent in a clean clone
    every = set().union(*(f for f in map(help_flags, programs) if isinstance(f, set)))
    for where, flags in bare:
        problems += [f"{where}: {f} is not a flag of any documented program" for f in flags if f not in every]
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", metavar="FILE.md", help="markdown files, relative to the repo root")
    ap.add_argument("--list", action="store_true", help="also print every command found (kind, program, flags)")
    args = ap.parse_args(argv)
    files = args.files or DOCS
    problems = check(files, args.list)
    for p in problems:
        print(p)
    if problems:
        return 1
    print(f"docs_check: the commands of {', '.join(files)} match their programs' --help and the Makefile "
          f"({len(_HELP)} programs' --help read)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
