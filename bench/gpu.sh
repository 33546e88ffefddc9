#!/usr/bin/env bash
# The GPU checks of the speed goals in one go, for a machine with one NVIDIA GPU (no network needed): random-init
# Qwen3-4B in bf16, this checkout against an older commit (BASE), the parts within BUDGET seconds (default 540).
#
#   GPU=DIR BASE=94fb8c9 bash bench/gpu.sh            # results under $OUT (default runs/gpu)
#
# What to provide (bench/README.md, "The GPU check", says the same): a python with a CUDA build of torch
# (.venv/bin/python when .venv exists, else python3), and in DIR (default .gpu):
#   qwen3-4b/              config.json + the Qwen3 tokenizer and chat template (no weights)
#   wheels/bfcl_eval-*.whl only when that python cannot import bfcl_eval (`make setup` installs it into .venv)
#   hf_static.py           optional: model.generate with a static cache, from a separate script
#   qwen3-4b-qwen25/       optional: the same config.json with the Qwen2.5 tokenizer and chat template. BASE commits
#                          before the Qwen3-template fix crash on the Qwen3 template at their first environment step,
#                          so when this folder is there the old-against-new rows (rollout, step) run both sides on it
# BASE is a commit (checked out as a worktree in /tmp/base) or a folder holding an older checkout (for a copy of the
# repository without .git, such as `git archive COMMIT | tar -x -C DIR`).
# Anything missing stops the script before any work, with one line naming it.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU=${GPU:-.gpu}; BASE=${BASE:-94fb8c9}; OUT=${OUT:-runs/gpu}
PY=python3; [ -x .venv/bin/python ] && PY=$PWD/.venv/bin/python
fail() { echo "bench/gpu.sh: $*" >&2; exit 2; }
[ -d "$GPU" ] || fail "no folder $GPU (set GPU=DIR, the folder with qwen3-4b/: see bench/README.md#the-gpu-check)"
GPU=$(cd "$GPU" && pwd); MODEL=random:$GPU/qwen3-4b   # absolute: BASE's step bench runs from $BASEDIR
OLD=$MODEL; [ -f "$GPU/qwen3-4b-qwen25/tokenizer.json" ] && OLD=random:$GPU/qwen3-4b-qwen25
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
if [ -f "$BASE/hintsd.py" ]; then BASEDIR=$(cd "$BASE" && pwd)
else
  BASEDIR=/tmp/base
  [ -d /tmp/base ] || git worktree add -q --detach /tmp/base "$BASE" 2> /dev/null \
    || fail "cannot check out BASE=$BASE into /tmp/base (a commit of this repository, or a folder with hintsd.py)"
  (cd /tmp/base && git checkout -q "$BASE") || fail "cannot check out BASE=$BASE in /tmp/base"
fi
mkdir -p "$OUT"
# each part gets min(its own limit, what is left of BUDGET seconds), so the whole script fits one short GPU lease;
# ONLY="name ..." runs those parts alone
BUDGET=${BUDGET:-540}; START=$SECONDS
run() {
  name=$1; t=$2; shift 2; left=$((BUDGET - (SECONDS - START))); [ "$t" -gt "$left" ] && t=$left
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi  # ONLY="generate train_step": a rerun
  if [ "$t" -lt 20 ]; then echo "== $name skipped (BUDGET=$BUDGET s spent)"; return; fi
  echo "== $name (limit $t s)"; timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "rc $? $(tail -n 3 "$OUT/$name.log")"
}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/device.txt"
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
  | tee "$OUT/python.txt"
# the generator: tokens/s against eager model.generate and the bandwidth bound, a 2,048-token prefill
run generate 100 "$PY" bench/generate.py --model "$MODEL" --batches 1 8 32 --prompt-len 256 --new 128 --reps 2
# greedy equality with model.generate in float32 (random weights give near-flat logits: bf16 rounding flips argmaxes)
run fp32 60 "$PY" bench/generate.py --model "$MODEL" --dtypes float32 --batches 8 --prompt-len 256 --new 64 --reps 1 \
  --prefill-len 0
# a whole training step (the 10 s goal) on the Qwen3 template, plain and under torchrun (nccl); same result?
run train_step 60 "$PY" hintsd.py --model "$MODEL" --feedback oracle --steps 1 --max-env-steps 10 \
  --max-new-tokens 128 --out "$OUT/train"
run torchrun_step 70 "$PY" -m torch.distributed.run --nproc_per_node=1 hintsd.py --model "$MODEL" --feedback oracle \
  --steps 1 --max-env-steps 10 --max-new-tokens 128 --out "$OUT/train-torchrun"
for f in train_step torchrun_step; do grep -ho "step 1:.*" "$OUT/$f.log" | sed 's/ | time.*//' > "$OUT/$f.result"; done
cmp -s "$OUT/train_step.result" "$OUT/torchrun_step.result" && [ -s "$OUT/train_step.result" ] \
  && echo "torchrun result equals the single-process run" || echo "torchrun result DIFFERS (or a run failed)"
# rollout() throughput, this code and BASE, same settings (2 tasks x 4 rollouts, 6 steps, 96 new tokens)
run rollout_new 45 "$PY" bench/rollout.py --model "$OLD" --env-steps 6 --new 96
run rollout_base 75 "$PY" bench/rollout.py --model "$OLD" --env-steps 6 --new 96 --code "$BASEDIR"
# one update on failed rollouts of the first train task (2 rollouts, as BASE's bench): HINT-SD, SDPO, no sharing
run step_new 60 "$PY" bench/step.py --model "$OLD" --env-steps 8 --new 64 --rollouts 2 --trajs "$OUT/trajs.jsonl"
run step_base 60 bash -c "cd '$BASEDIR' && '$PY' bench/step.py --model '$OLD' --env-steps 8 --new 64"
# model.generate with a static cache (transformers compiles its decode step)
if [ -f "$GPU/hf_static.py" ]; then run hf_static 80 "$PY" "$GPU/hf_static.py" "$GPU/qwen3-4b" static 1,8
else echo "== hf_static skipped (no $GPU/hf_static.py)"; fi
# every method's step on the same rollouts (oracle feedback where a method needs parseable targets)
run efficiency 200 "$PY" bench/efficiency.py --methods hintsd sdpo grpo sft --out "$OUT/efficiency" -- \
  --model "$MODEL" --feedback oracle --max-env-steps 10 --max-new-tokens 128
grep -h "" "$OUT"/*.log | grep -E "^\||tok/s|seconds|step 1:|identical" | tail -60
