#!/usr/bin/env bash
# Issues 4 and 8 on one 4-GPU host (nvidia-h200-x4), in two `device` calls on the same machine:
#   bash benchmarks/gpu_scaling.sh a   # 1.3B transformer on 1/2/4 GPUs (FSDP), hope_340m on 1/2 GPUs,
#                                      # hope_1.3b on 1 GPU, hope_760m at seq 65536; 4-GPU run saves step 10
#   bash benchmarks/gpu_scaling.sh b   # restore the 4-GPU checkpoint on 2 GPUs; hope_1.3b on 2 and 4 GPUs
#   bash benchmarks/gpu_scaling.sh c   # hope_1.3b FSDP on 4 GPUs restored on 2; transformer DP 2/4
#   bash benchmarks/gpu_scaling.sh x2  # on nvidia-h200-x2: transformer_1.3b on 1 GPU and FSDP on 2
#                                      # (cuDNN attention), the 2-GPU checkpoint restored on 1
#   bash benchmarks/gpu_scaling.sh x2h # on nvidia-h200-x2: hope_1.3b on 1 GPU (beside hope_760m at
#                                      # seq 65536), then FSDP on 2
#   bash benchmarks/gpu_scaling.sh x2i # on nvidia-h200-x2: hope_1.3b FSDP on 2 GPUs with the inverse
#                                      # solve, NCCL_DEBUG=INFO and GPU utilisation sampled every 15 s
# TMO=seconds before `train` bounds one run (a stuck compile must not eat the device budget).
set -u
OUT=${OUT:-/tmp/out}
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=.:/tmp/site; fi
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
F='grep -v ^W0000\|^I0000\|^W1122\|^I1122'
W=/tmp/runs
train() {  # name gpus preset per_gpu_batch steps extra...
  local name=$1 gpus=$2 preset=$3 b=$4 steps=$5; shift 5
  local n=$(( $(echo $gpus | tr -cd , | wc -c) + 1 ))
  CUDA_VISIBLE_DEVICES=$gpus timeout ${TMO:-0} python launch/train.py --config=experiments/lm.py:$preset --workdir=$W/$name \
    --config.seq_len=2048 --config.global_batch_size=$((b * n)) --config.num_steps=$steps \
    --config.model.dtype=bfloat16 --config.eval.every_steps=0 --config.data.eval_batches=1 \
    --config.logging.every_steps=2 --config.logging.tensorboard=False "$@" > $W/$name.log 2>&1
  echo "== $name: $(grep -c . $W/$name.log) log lines"; $F $W/$name.log | grep "\[compile\]\|\[memory\]\|\[resume\]\|\[checkpoint\]\|Error\|error" | head -6
}
compare_losses() {  # label run_a run_b: train losses of the steps both runs logged
  python - "$@" <<'PY'
import json, sys
label, a, b = sys.argv[1], *(f"/tmp/runs/{n}/metrics.jsonl" for n in sys.argv[2:])
rec = lambda p: {r["step"]: r["loss"] for r in map(json.loads, open(p)) if r.get("split") == "train" and "loss" in r}
a, b = rec(a), rec(b)
common = sorted(set(a) & set(b))
print(label, "steps", common)
print("max |loss diff|:", max(abs(a[s] - b[s]) for s in common) if common else "no common steps")
for s in common: print(s, a[s], b[s])
PY
}
mkdir -p $W
T="--config.model.attention.implementation=cudnn --config.mesh.data=1 --config.mesh.fsdp=-1"
if [ "$1" = a ]; then
  train t13_g1 0 transformer_1.3b 8 30 $T --config.checkpoint.every_steps=1000 &
  train t13_g2 1,2 transformer_1.3b 8 30 $T --config.checkpoint.every_steps=1000 &
  train h340_g1 3 hope_340m 8 12 --config.checkpoint.every_steps=1000 &
  wait
  train h340_g2 0,1 hope_340m 8 12 --config.checkpoint.every_steps=1000 &
  train h13_g1 2 hope_1.3b 2 6 --config.checkpoint.every_steps=1000 &
  (CUDA_VISIBLE_DEVICES=3 timeout 170 python benchmarks/throughput.py --steps=1 --seq_len=65536 --batch=1 \
     --presets=hope_760m --out=$OUT/hope760_64k.json 2>&1 | $F | tail -3) &
  wait
  train t13_g4 0,1,2,3 transformer_1.3b 8 20 $T --config.checkpoint.every_steps=10 --config.checkpoint.keep=5 --config.logging.every_steps=1
  python benchmarks/summarize_runs.py t13_g1=$W/t13_g1:1 t13_g2=$W/t13_g2:2 t13_g4=$W/t13_g4:4 \
    h340_g1=$W/h340_g1:1 h340_g2=$W/h340_g2:2 h13_g1=$W/h13_g1:1 --out=$OUT/scaling_a.json
fi
if [ "$1" = b ]; then
  rm -rf $W/t13_r2 && cp -r $W/t13_g4 $W/t13_r2 && rm -rf $W/t13_r2/checkpoints/20 && rm -f $W/t13_r2/metrics.jsonl
  train t13_r2 0,1 transformer_1.3b 16 20 $T --config.checkpoint.every_steps=10 --config.logging.every_steps=1 &
  train h13_g2 2,3 hope_1.3b 2 6 --config.checkpoint.every_steps=1000 &
  wait
  train h13_g4 0,1,2,3 hope_1.3b 2 6 --config.checkpoint.every_steps=1000
  python benchmarks/summarize_runs.py t13_g4=$W/t13_g4:4 t13_r2=$W/t13_r2:2 h13_g1=$W/h13_g1:1 \
    h13_g2=$W/h13_g2:2 h13_g4=$W/h13_g4:4 --out=$OUT/scaling_b.json
  compare_losses "resharded restore 4->2 GPUs" t13_g4 t13_r2
fi
if [ "$1" = c ]; then  # what fit the remaining device time after stage a (see BENCHMARKS.md)
  H="--config.mesh.data=1 --config.mesh.fsdp=-1 --config.logging.every_steps=1"
  TMO=180 train h13_g4 0,1,2,3 hope_1.3b 2 4 $H --config.checkpoint.every_steps=2 --config.checkpoint.keep=3
  rm -rf $W/h13_r2 && cp -r $W/h13_g4 $W/h13_r2 && rm -rf $W/h13_r2/checkpoints/4 && rm -f $W/h13_r2/metrics.jsonl
  D="--config.model.attention.implementation=cudnn --config.mesh.data=-1 --config.checkpoint.every_steps=1000"
  TMO=180 train h13_r2 0,1 hope_1.3b 4 4 $H --config.checkpoint.every_steps=1000 &
  TMO=120 train t13_dp2 2,3 transformer_1.3b 8 20 $D &
  wait
  TMO=120 train t13_dp4 0,1,2,3 transformer_1.3b 8 20 $D
  python benchmarks/summarize_runs.py t13_g1=$W/t13_g1:1 t13_dp2=$W/t13_dp2:2 t13_dp4=$W/t13_dp4:4 \
    h13_g1=$W/h13_g1:1 h13_r2=$W/h13_r2:2 h13_g4=$W/h13_g4:4 --out=$OUT/scaling_c.json
  compare_losses "hope_1.3b fsdp=4 restored on fsdp=2" h13_g4 h13_r2
fi
if [ "$1" = x2h ]; then  # hope_1.3b alone, longer limits: 1 GPU beside hope_760m at 64K, then FSDP 2
  H="--config.mesh.data=1 --config.mesh.fsdp=-1 --config.logging.every_steps=1"
  TMO=270 train h13_g1 0 hope_1.3b 2 5 $H --config.checkpoint.every_steps=1000 &
  (CUDA_VISIBLE_DEVICES=1 timeout 270 python benchmarks/throughput.py --steps=1 --seq_len=65536 --batch=1 \
     --presets=hope_760m --set=memory.solve=inverse --out=$OUT/hope760_64k.json 2>&1 | $F | tail -3) &
  wait
  TMO=270 train h13_f2 0,1 hope_1.3b 2 5 $H --config.checkpoint.every_steps=1000
  python benchmarks/summarize_runs.py h13_g1=$W/h13_g1:1 h13_f2=$W/h13_f2:2 --out=$OUT/scaling_x2h.json
  tail -n 5 $W/h13_g1.log $W/h13_f2.log
fi
if [ "$1" = x2i ]; then  # did hope_1.3b FSDP stall (idle GPUs) or crawl (busy GPUs)?
  H="--config.mesh.data=1 --config.mesh.fsdp=-1 --config.logging.every_steps=1"
  (while sleep 15; do nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader \
     | tr '\n' ' '; echo; done > $OUT/gpu_util.txt) &
  SMI=$!
  NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT TMO=330 train h13_f2i 0,1 hope_1.3b 2 5 $H \
    --config.checkpoint.every_steps=1000 --config.model.memory.solve=inverse
  kill $SMI
  python benchmarks/summarize_runs.py h13_f2i=$W/h13_f2i:2 --out=$OUT/scaling_x2i.json
  grep -c NCCL $W/h13_f2i.log; grep "NCCL" $W/h13_f2i.log | grep -v "NCCL INFO" | head -5
  $F $W/h13_f2i.log | grep -v NCCL | tail -n 12; cp $W/h13_f2i.log $OUT/ 2>/dev/null
  cat $OUT/gpu_util.txt | tail -n 25
fi
if [ "$1" = x2 ]; then  # FSDP with cuDNN attention (q/k/v pinned alike), resharded restore 2 -> 1
  TMO=150 train t13_g1 0 transformer_1.3b 8 20 $T --config.checkpoint.every_steps=1000
  TMO=120 train t13_f2 0,1 transformer_1.3b 8 20 $T --config.checkpoint.every_steps=10 --config.checkpoint.keep=5
  rm -rf $W/t13_r1 && cp -r $W/t13_f2 $W/t13_r1 && rm -rf $W/t13_r1/checkpoints/20 && rm -f $W/t13_r1/metrics.jsonl
  TMO=140 train t13_r1 0 transformer_1.3b 16 20 $T --config.checkpoint.every_steps=1000
  python benchmarks/summarize_runs.py t13_g1=$W/t13_g1:1 t13_f2=$W/t13_f2:2 t13_r1=$W/t13_r1:1 \
    --out=$OUT/scaling_x2.json
  compare_losses "resharded restore 2->1 GPUs" t13_f2 t13_r1
fi
grep -h "\[resume\]\|\[checkpoint\]" $W/*.log 2>/dev/null | head
