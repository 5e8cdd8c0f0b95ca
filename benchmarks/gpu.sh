#!/usr/bin/env bash
# GPU step times beside psgdax, as one run that fits a short GPU lease (each part at most
# 150 s; not yet run on a GPU): the MLP of scale.py at update probability 0.1,
#   1. as recorded before (the step's arguments not donated);
#   2. with params and state donated (stable buffer addresses for XLA:GPU's command buffers);
#   3. with conditionals kept out of the command buffers (a step that does not fit should
#      not pay for updating the fit's recorded commands: deviceless_gpu.py shows the
#      default step as one buffer of 275 commands, 199 of them the untaken fit, and 76 in
#      3 buffers with this flag, against psgdax's 166 and 137);
#   4. with command buffers off (the kernels alone: 0.73x psgdax on the H100 in 2026-11);
# then the compile time of 4 vs 32 blocks.
#
#     bash benchmarks/gpu.sh [LOG_DIR]
#
# Needs psgdax importable (pip install psgdax); psgd_optax is read from this checkout, and
# PYTHON (default python3) names the interpreter.
# Each part is under its own time limit, so one slow compile does not cost the others.
set -uo pipefail
log_dir="${1:-.}"
mkdir -p "$log_dir" && log_dir="$(cd "$log_dir" && pwd)"
cd "$(dirname "$0")"
export PYTHONPATH="$(cd .. && pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Our products would run in TF32 on the GPU by default while psgdax is set to float32.
export JAX_DEFAULT_MATMUL_PRECISION=highest
python="${PYTHON:-python3}"
versus=("$python" scale.py --versus psgdax --models mlp --probabilities 0.1
        --steps ${STEPS:-30} --rounds ${ROUNDS:-3})
part() {  # part NAME SECONDS COMMAND...: runs COMMAND under a time limit, logged to NAME.txt
  local name=$1 seconds=$2
  shift 2
  echo "== $name: $*"
  timeout "$seconds" "$@" 2>&1 | grep -v "^PSGD " | tee "$log_dir/$name.txt"
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
"$python" -c "import jax, optax, psgdax; print('jax', jax.__version__, 'optax', optax.__version__, jax.devices())"
part baseline 150 "${versus[@]}"
part donated 150 "${versus[@]}" --donate
part no_conditional_command_buffers 150 \
  env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=-CONDITIONAL" "${versus[@]}"
part no_command_buffers 150 \
  env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" "${versus[@]}"
part compile 150 "$python" scale.py --blocks 4 32 --rounds 1
