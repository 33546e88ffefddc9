#!/usr/bin/env bash
# The GPU checks of the speed goals, as one script for a machine with one NVIDIA GPU and no network (see
# ../shared/gpu/README.md): random-init Qwen3-4B in bf16, this checkout against an older commit (BASE) in one run.
#
#   GPU=.gpu BASE=94fb8c9 bash bench/gpu.sh            # results under $OUT (or runs/gpu)
#
# $GPU holds what such a machine lacks: qwen3-4b/ (config + tokenizer), wheels/bfcl_eval-*.whl, hf_static.py.
# Every part has its own timeout, so one slow part cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU=${GPU:-.gpu}; BASE=${BASE:-94fb8c9}; OUT=${OUT:-runs/gpu}; MODEL=random:$GPU/qwen3-4b
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$GPU"/wheels/*.whl
export PYTHONPATH=/tmp/site
[ -d /tmp/base ] || git worktree add -q /tmp/base "$BASE" 2>/dev/null || git clone -q . /tmp/base -b "$BASE"
(cd /tmp/base && git checkout -q "$BASE")
run() { name=$1; shift; echo "== $name"; timeout "$@" > "$OUT/$name.log" 2>&1; echo "rc $? $(tail -n 3 "$OUT/$name.log")"; }
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/device.txt"
# the generator: tokens/s against model.generate (eager and static cache) and the bandwidth bound
run generate 300 python3 bench/generate.py --model "$MODEL" --batches 1 8 32 --prompt-len 256 --new 128 --static \
  --fp32-check
run hf_static 200 python3 "$GPU/hf_static.py" "$GPU/qwen3-4b" static 1,8
# rollout() throughput, this code and BASE, same settings (2 tasks x 4 rollouts, 6 steps, 96 new tokens)
run rollout_new 200 python3 bench/rollout.py --model "$MODEL" --env-steps 6 --new 96
run rollout_base 300 python3 bench/rollout.py --model "$MODEL" --env-steps 6 --new 96 --code /tmp/base
# one update on the same failed rollouts: HINT-SD, SDPO, no prefix sharing; then BASE's own step bench
run step_new 300 python3 bench/step.py --model "$MODEL" --env-steps 8 --new 64 --rollouts 4 --trajs "$OUT/trajs.jsonl"
run step_base 300 bash -c "cd /tmp/base && python3 bench/step.py --model '$MODEL' --env-steps 8 --new 64"
# a whole training step (the 10 s goal), plain and under torchrun
run train_step 300 python3 hintsd.py --model "$MODEL" --feedback oracle --steps 1 --max-env-steps 10 \
  --max-new-tokens 128 --out "$OUT/train"
run torchrun_step 300 torchrun --nproc_per_node=1 hintsd.py --model "$MODEL" --feedback oracle --steps 1 \
  --max-env-steps 10 --max-new-tokens 128 --out "$OUT/train-torchrun"
# every method's step on the same rollouts (oracle feedback where a method needs parseable targets)
run efficiency 500 python3 bench/efficiency.py --methods hintsd sdpo grpo sft --out "$OUT/efficiency" -- \
  --model "$MODEL" --feedback oracle --max-env-steps 10 --max-new-tokens 128
grep -h "" "$OUT"/*.log | grep -E "^\||tok/s|seconds|step 1:" | tail -60
