#!/usr/bin/env bash
# The GPU checks of the speed goals in one go, for a machine with one NVIDIA GPU (no network needed): random-init
# Qwen3-4B in bf16, this checkout against an older commit (BASE), each part with its own timeout.
#
#   GPU=DIR BASE=94fb8c9 bash bench/gpu.sh            # results under $OUT (default runs/gpu)
#
# What to provide (bench/README.md, "The GPU check", says the same): a python with a CUDA build of torch
# (.venv/bin/python when .venv exists, else python3), and in DIR (default .gpu):
#   qwen3-4b/              config.json + the Qwen3 tokenizer and chat template (no weights)
#   wheels/bfcl_eval-*.whl only when that python cannot import bfcl_eval (`make setup` installs it into .venv)
#   hf_static.py           optional: model.generate with a static cache, from a separate script
# Anything missing stops the script before any work, with one line naming it.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU=${GPU:-.gpu}; BASE=${BASE:-94fb8c9}; OUT=${OUT:-runs/gpu}
PY=python3; [ -x .venv/bin/python ] && PY=$PWD/.venv/bin/python
fail() { echo "bench/gpu.sh: $*" >&2; exit 2; }
[ -d "$GPU" ] || fail "no folder $GPU (set GPU=DIR, the folder with qwen3-4b/: see bench/README.md#the-gpu-check)"
GPU=$(cd "$GPU" && pwd); MODEL=random:$GPU/qwen3-4b   # absolute: BASE's step bench runs from /tmp/base
SEE="see bench/README.md#the-gpu-check"
[ -f "$GPU/qwen3-4b/config.json" ] || fail "missing $GPU/qwen3-4b/config.json (the Qwen3-4B-Instruct-2507 config; $SEE)"
[ -f "$GPU/qwen3-4b/tokenizer.json" ] || fail "missing $GPU/qwen3-4b/tokenizer.json (the Qwen3 tokenizer; $SEE)"
[ -f "$GPU/qwen3-4b/chat_template.jinja" ] || grep -q '"chat_template"' "$GPU/qwen3-4b/tokenizer_config.json" \
  2> /dev/null || fail "missing a chat template in $GPU/qwen3-4b (chat_template.jinja, or in tokenizer_config.json)"
command -v nvidia-smi > /dev/null || fail "no nvidia-smi: this script needs a machine with an NVIDIA GPU"
command -v "$PY" > /dev/null || fail "no $PY (make setup creates .venv)"
"$PY" -c "import torch, transformers, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
  || fail "$PY has no torch / transformers that sees a CUDA GPU (install a CUDA build of torch: README.md, GPU users)"
if ! "$PY" -c "import bfcl_eval" 2> /dev/null; then
  WHEEL=$(ls "$GPU"/wheels/bfcl_eval-*.whl 2> /dev/null | head -n 1)
  [ -n "$WHEEL" ] || fail "$PY cannot import bfcl_eval and there is no $GPU/wheels/bfcl_eval-*.whl to install it from"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEEL" || fail "cannot install $WHEEL"
  export PYTHONPATH=/tmp/site
fi
[ -d /tmp/base ] || git worktree add -q --detach /tmp/base "$BASE" 2> /dev/null \
  || fail "cannot check out BASE=$BASE into /tmp/base (a commit of this repository's history)"
(cd /tmp/base && git checkout -q "$BASE") || fail "cannot check out BASE=$BASE in /tmp/base"
mkdir -p "$OUT"
run() { name=$1; shift; echo "== $name"; timeout "$@" > "$OUT/$name.log" 2>&1; echo "rc $? $(tail -n 3 "$OUT/$name.log")"; }
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/device.txt"
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
  | tee "$OUT/python.txt"
# the generator: tokens/s against model.generate (eager and static cache) and the bandwidth bound
run generate 300 "$PY" bench/generate.py --model "$MODEL" --batches 1 8 32 --prompt-len 256 --new 128 --static \
  --fp32-check
if [ -f "$GPU/hf_static.py" ]; then run hf_static 200 "$PY" "$GPU/hf_static.py" "$GPU/qwen3-4b" static 1,8
else echo "== hf_static skipped (no $GPU/hf_static.py; generate.py --static has model.generate's static cache)"; fi
# rollout() throughput, this code and BASE, same settings (2 tasks x 4 rollouts, 6 steps, 96 new tokens)
run rollout_new 200 "$PY" bench/rollout.py --model "$MODEL" --env-steps 6 --new 96
run rollout_base 300 "$PY" bench/rollout.py --model "$MODEL" --env-steps 6 --new 96 --code /tmp/base
# one update on the same failed rollouts: HINT-SD, SDPO, no prefix sharing; then BASE's own step bench
run step_new 300 "$PY" bench/step.py --model "$MODEL" --env-steps 8 --new 64 --rollouts 4 --trajs "$OUT/trajs.jsonl"
run step_base 300 bash -c "cd /tmp/base && '$PY' bench/step.py --model '$MODEL' --env-steps 8 --new 64"
# a whole training step (the 10 s goal), plain and under torchrun
run train_step 300 "$PY" hintsd.py --model "$MODEL" --feedback oracle --steps 1 --max-env-steps 10 \
  --max-new-tokens 128 --out "$OUT/train"
run torchrun_step 300 "$PY" -m torch.distributed.run --nproc_per_node=1 hintsd.py --model "$MODEL" --feedback oracle \
  --steps 1 --max-env-steps 10 --max-new-tokens 128 --out "$OUT/train-torchrun"
# every method's step on the same rollouts (oracle feedback where a method needs parseable targets)
run efficiency 500 "$PY" bench/efficiency.py --methods hintsd sdpo grpo sft --out "$OUT/efficiency" -- \
  --model "$MODEL" --feedback oracle --max-env-steps 10 --max-new-tokens 128
grep -h "" "$OUT"/*.log | grep -E "^\||tok/s|seconds|step 1:" | tail -60
