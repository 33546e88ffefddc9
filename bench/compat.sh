#!/usr/bin/env bash
# The tests under another transformers version, in a venv of their own (.venv-tf<VERSION>), installed from
# requirements.txt's ranges as a user's image would be. A CPU job, not CI: a few minutes for the family matrix.
#
#   bash bench/compat.sh 4.57.6                       # the family matrix (tests/test_families.py)
#   TESTS=tests bash bench/compat.sh 5.17.0           # the whole suite
set -euo pipefail
cd "$(dirname "$0")/.."
V=${1:?usage: bench/compat.sh TRANSFORMERS_VERSION}
VENV=.venv-tf$V
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -r requirements.txt "transformers==$V" torch==2.13.0
"$VENV/bin/python" -m pip install -q --no-deps bfcl-eval==2026.3.23
"$VENV/bin/python" -c "import torch, transformers, tokenizers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'tokenizers', tokenizers.__version__)"
"$VENV/bin/python" -m pytest -q ${TESTS:-tests/test_families.py}
