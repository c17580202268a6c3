#!/usr/bin/env bash
# The GPU runs behind BENCHMARKS.md's tables, in named suites that each fit a 10-minute run:
#
#   bash benchmarks/gpu_suites.sh SUITE [SUITE ...]
#
#   throughput  one GPU: transformer_340m (batch 8, 16), titans_lmm_340m (batch 32),
#               hope_340m (batch 8), all at seq 4096                       -> "One GPU"
#   long        one GPU: hope_340m at seq 4096 and 32768 (batch 4), hope_760m at seq 65536
#               (batch 1)                                                   -> "Long sequences"
#   profile     one GPU: hope_340m's full-depth step, profiled, split into the memory layers'
#               inner recurrences and the rest                             -> "Where Hope's step goes"
#   gdn         one GPU: jax-linear-attention's Gated DeltaNet at the 340M shape beside
#               transformer_340m and hope_340m, batch 8 on an H200 and 4 on an H100 (BATCH=
#               sets it; needs the `jla` package)                           -> "One GPU"
#   scaling     2 GPUs of one host: transformer_1.3b and hope_1.3b on 1 GPU, then FSDP on 2,
#               and the 2-GPU checkpoint restored on 1                     -> "Several GPUs"
#   walk        one GPU: benchmarks/memory_walk.py, Hope's M_memory as the persistent Mosaic GPU
#               kernel against XLA's chunk scan at hope_340m's shape (batch 4 x 16 heads, seq
#               4096, chunk 64): us per chunk step, forward and backward, and one chunk
#               step's reverse, XLA's against the staged kernels           -> "Kernels"
#   walk_model  one GPU: the 4-layer hope_340m step (seq 4096 x 8) with the walk (auto), with
#               the projection memories' walk too (walk_all), with the projection memories'
#               written-out backward (chunk_step), and with every kernel at once (walk_all and
#               both backwards as kernels)
#                                                                           -> "Kernels"
#   kernels     one GPU: the compiled kernels' tests (Mosaic GPU and Triton, every test named
#               "compiled ... gpu"), against XLA and chunk_step; rerun whenever a kernel changes
#   stability   one GPU: benchmarks/divergence_check.py, 1000 trainer steps of hope_340m,
#               titans_lmm_340m and transformer_340m (2 seeds each) at 4 layers, a 250-step
#               learning-rate sweep, Hope's paper form and Hope without the walk (the
#               walk's quality guard: beside the sweep's 1e-3 run, the walk on Hopper), side
#               by side: the first non-finite step or "finite", and validation bits/byte at
#               steps 250, 500, 1000;
#               PARTS=deep: hope_340m at full depth, 300 steps (alone: ~16 minutes on an
#               H200, estimated from its tokens/s); PARTS=walk_all: Hope with
#               memory.kernel=walk_all and projection_backward=chunk_step (their quality
#               guard, beside the sweep's 1e-3 run); resumable (run it again); PARTS= picks
#               among "long sweep paper walk walk_all deep" (default all but deep and
#               walk_all), RUNS= and SWEEP= narrow them
#                                                       -> "Training stability and quality"
#
# Rows are JSON under $OUT (default ./bench_out) and tables on stdout. Every model-level tool
# times the trainer's own train step (nl_jax.train.step) and reports MFU in one convention
# (nl_jax/train/metrics.py); memory_walk.py times one memory's kernel alone. Environment: OUT, TMO (seconds per command, default 280).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
TMO=${TMO:-280}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 NCCL_NVLS_ENABLE=0
PY=${PY:-python3}
quiet() { grep -v '^W0000\|^I0000'; }
T="timeout $TMO $PY benchmarks/throughput.py --steps=3 --seq_len=4096"

train() {  # name gpus preset global_batch steps extra...: one trainer run on the given GPUs
  local name=$1 gpus=$2 preset=$3 batch=$4 steps=$5
  shift 5
  CUDA_VISIBLE_DEVICES=$gpus timeout "$TMO" $PY launch/train.py \
    --config=experiments/lm.py:"$preset" --workdir="$OUT/runs/$name" \
    --config.seq_len=2048 --config.global_batch_size="$batch" --config.num_steps="$steps" \
    --config.model.dtype=bfloat16 --config.eval.every_steps=0 --config.data.eval_batches=1 \
    --config.logging.every_steps=2 --config.logging.tensorboard=False "$@" 2>&1 | quiet | tail -3
}

suite_throughput() {
  $T --batch=8 --presets=transformer_340m,hope_340m --out="$OUT/throughput_b8.json" | quiet
  $T --batch=16 --presets=transformer_340m --out="$OUT/throughput_b16.json" | quiet
  $T --batch=32 --presets=titans_lmm_340m --out="$OUT/throughput_titans.json" | quiet
}

suite_long() {
  $T --batch=4 --presets=hope_340m --out="$OUT/long_4096.json" | quiet
  timeout "$TMO" $PY benchmarks/throughput.py --steps=2 --seq_len=32768 --batch=4 \
    --presets=hope_340m --out="$OUT/long_32768.json" | quiet
  timeout "$TMO" $PY benchmarks/throughput.py --steps=1 --seq_len=65536 --batch=1 \
    --presets=hope_760m --out="$OUT/long_65536.json" | quiet
}

suite_profile() {
  timeout 500 $PY benchmarks/throughput.py --steps=2 --seq_len=4096 --batch=8 \
    --presets=hope_340m --profile="$OUT/profile" --profile_steps=1 --profile_top=10 \
    --out="$OUT/profile.json" | quiet
}

suite_gdn() {
  # Batch 8 on an H200; 4 on an H100, where jla's Gated DeltaNet runs out of memory at 8.
  local mib b
  mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
  b=${BATCH:-$([ "${mib:-0}" -gt 100000 ] && echo 8 || echo 4)}
  timeout "$TMO" $PY benchmarks/gdn_baseline.py --seq_len=4096 --batch="$b" --steps=3 --out="$OUT/gdn.json" | quiet
  $T --batch="$b" --presets=transformer_340m --out="$OUT/gdn_side.json" | quiet
  # hope_340m's full-depth step took over 225 s to compile on a machine with a cold cache.
  timeout $((2 * TMO)) $PY benchmarks/throughput.py --steps=3 --seq_len=4096 --batch="$b" \
    --presets=hope_340m --out="$OUT/gdn_hope.json" | quiet
}

suite_scaling() {
  train t13_1 0 transformer_1.3b 8 20 --config.checkpoint.every_steps=10
  train t13_2 0,1 transformer_1.3b 16 20 --config.mesh.fsdp=-1 --config.mesh.data=1 \
    --config.checkpoint.every_steps=10
  mkdir -p "$OUT/runs/t13_2to1" && cp -r "$OUT/runs/t13_2/checkpoints" "$OUT/runs/t13_2to1/" &&
    rm -rf "$OUT/runs/t13_2to1/checkpoints/20"
  train t13_2to1 0 transformer_1.3b 16 20
  train h13_1 0 hope_1.3b 2 8
  train h13_2 0,1 hope_1.3b 4 8 --config.mesh.fsdp=-1 --config.mesh.data=1
  $PY benchmarks/summarize_runs.py t13_1="$OUT/runs/t13_1:1" t13_2="$OUT/runs/t13_2:2" \
    t13_2to1="$OUT/runs/t13_2to1:1" h13_1="$OUT/runs/h13_1:1" h13_2="$OUT/runs/h13_2:2" \
    --out="$OUT/scaling.json"
}

suite_walk() {
  timeout "$TMO" $PY benchmarks/memory_walk.py --n=64 --seq=4096 --chunk=64 --dim=64 --parts \
    --reverse --out="$OUT/memory_walk.json" 2>&1 | quiet
}

suite_walk_model() {
  # Each 4-layer compile takes 2-3 minutes on a live GPU (autotuning): a longer limit.
  timeout $((2 * TMO)) $PY benchmarks/throughput.py --steps=4 --seq_len=4096 --batch=8 \
    --presets=hope_340m --set=num_layers=4 --variants="walk:memory.kernel=walk|walk_all:memory.kernel=walk_all|chunk_step_backward:memory.kernel=walk;memory.projection_backward=chunk_step|kernel_backwards:memory.kernel=walk_all;memory.walk_backward=kernel;memory.projection_backward=kernel" \
    --out="$OUT/throughput_walk.json" 2>&1 | quiet
}

suite_kernels() {
  # Compiled on an H100 the staged and streamed reverse took 60 s and 127 s: twice the limit.
  JAX_PLATFORMS=cuda timeout $((2 * TMO)) $PY -m pytest -q -p no:cacheprovider -rs \
    -k "compiled and gpu" tests/test_walk_backward.py tests/test_fused_scan.py \
    tests/test_fused_level.py tests/test_projection_walk.py tests/test_projection_backward.py \
    2>&1 | quiet | tail -15
}

suite_stability() {
  # 4 layers, seq 2048 x 8: 1,000 steps of two seeds per family, the learning-rate sweep
  # (250-step runs at 3e-4, 1e-3 and 3e-3: a 250-step run's cosine schedule has decayed by its
  # step 250, a long run's has not, so the long runs' step 250 is no sweep point), Hope's
  # paper form (the stable inner loop's switches off; cut and uncut meta-gradient) and Hope's
  # 250-step run without the walk, on one GPU; PARTS=deep: hope_340m at full depth, 300 steps.
  # Longer than one 10-minute call: run the suite again on the same machine and every
  # unfinished run continues from its checkpoint. JAX_COMPILATION_CACHE_DIR saves recompiles.
  local full="--config.seq_len=2048 --config.global_batch_size=8 --config.model.dtype=bfloat16"
  full="$full --config.data.eval_batches=4 --config.logging.tensorboard=False"
  local c="--config.model.num_layers=4 $full"
  local m=--config.model.memory
  local paper="$m.rule.normalize_memory=False $m.rule.momentum_ema=False $m.rule.normalize_chunk=False"
  local dc="$PY benchmarks/divergence_check.py --time_budget=${BUDGET:-500} --checkpoint_every=250"
  local long=${RUNS:-hope_340m:0,hope_340m:1,titans_lmm_340m:0,titans_lmm_340m:1,transformer_340m:0,transformer_340m:1}
  # The short runs first: a hope_340m trainer at this size peaks at about 10 GiB, and six of
  # them beside the others ran an H100 out of memory.
  local sweep=${SWEEP:-}
  if [ -z "$sweep" ]; then
    for p in titans_lmm_340m transformer_340m hope_340m; do
      sweep=$sweep${sweep:+,}$p:0:3e-4,$p:0:1e-3,$p:0:3e-3
    done
  fi
  local parts=" ${PARTS:-long sweep paper walk} " names=""
  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the trainers share the GPU
  if [[ $parts == *" long "* ]]; then
    names="$names stability"
    $dc --root="$OUT/stability" --parallel=6 --steps=1000 --eval_every=250 --runs="$long" -- $c \
      >"$OUT/stability.log" 2>&1 &
  fi
  if [[ $parts == *" sweep "* ]]; then
    names="$names lr_sweep"
    $dc --root="$OUT/lr_sweep" --parallel=2 --steps=250 --eval_every=250 --runs="$sweep" -- $c \
      >"$OUT/lr_sweep.log" 2>&1 &
  fi
  if [[ $parts == *" paper "* ]]; then
    names="$names paper_form paper_form_uncut"
    $dc --root="$OUT/paper_form" --steps=300 --eval_every=100 --runs=hope_340m:0 -- $c $paper \
      >"$OUT/paper_form.log" 2>&1 &
    $dc --root="$OUT/paper_form_uncut" --steps=300 --eval_every=100 --runs=hope_340m:0 -- $c \
      $paper $m.backprop_chunks=0 $m.parallel_windows=False >"$OUT/paper_form_uncut.log" 2>&1 &
  fi
  if [[ $parts == *" deep "* ]]; then
    names="$names full_depth"
    $dc --root="$OUT/full_depth" --steps=300 --eval_every=100 --runs=hope_340m:0 -- $full \
      >"$OUT/full_depth.log" 2>&1 &
  fi
  if [[ $parts == *" walk "* ]]; then
    # M_memory as XLA ops, against the sweep's preset run (on Hopper, the Mosaic GPU walk).
    names="$names walk_guard"
    $dc --root="$OUT/walk_guard" --steps=250 --eval_every=250 --runs=hope_340m:0:1e-3 -- $c \
      $m.kernel=pallas_forward >"$OUT/walk_guard.log" 2>&1 &
  fi
  if [[ $parts == *" walk_all "* ]]; then
    # The projection memories' walk (bf16 reads) and their written-out reverse, against the
    # sweep's preset run.
    names="$names walk_all_guard"
    $dc --root="$OUT/walk_all_guard" --steps=250 --eval_every=250 --runs=hope_340m:0:1e-3 -- $c \
      $m.kernel=walk_all $m.projection_backward=chunk_step >"$OUT/walk_all_guard.log" 2>&1 &
  fi
  wait
  for name in $names; do
    echo "-- $name"
    grep -v '^W0000\|^I0000' "$OUT/$name.log" | tail -14
  done
}

[ $# -gt 0 ] || { sed -n '2,/^# Rows/p' "$0" | sed '$d'; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
# "-dirty": the tree that ran differs from that commit (a copied working tree, uncommitted edits).
git update-index -q --refresh 2>/dev/null
echo "commit $(git describe --always --dirty 2>/dev/null || echo unknown), $(date -u +%F)"
for suite in "$@"; do
  if ! declare -f "suite_$suite" >/dev/null; then
    echo "unknown suite '$suite' (throughput long profile gdn scaling walk walk_model kernels stability)" >&2
    exit 2
  fi
  echo "== $suite"
  "suite_$suite"
done
