#!/usr/bin/env bash
# Issue 7 exploration on one GPU (one `device` call): baselines and Hope variants at 4 layers
# (fast compiles), then one command-buffer run. Rows land in $OUT/*.json; logs in $OUT/*.log.
set -u
# ml_collections (and grain) are not on the GPU image: carry .whl (see WORKSPACE.md).
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=.:/tmp/site; fi
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
T="python benchmarks/throughput.py --seq_len=4096 --batch=8 --steps=4"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 120 $T --presets=transformer_340m --variants="xla:attention.implementation='';|cudnn:attention.implementation=cudnn" \
  --out=$OUT/transformer.json 2>&1 | grep -v "^W0000\|^I0000" | tail -12
timeout 300 $T --presets=hope_340m --set=num_layers=4 \
  --variants="c8_16:memory.remat_layer=False|c8_16_rl:memory.remat_layer=True|c16_64_rl:memory.chunk_size_other=16;memory.chunk_size=64" \
  --profile=/tmp/prof_hope4 --out=$OUT/hope4.json 2>&1 | grep -v "^W0000\|^I0000" | tail -40
timeout 90 $T --presets=titans_lmm_340m --set=num_layers=4 --out=$OUT/titans4.json 2>&1 | grep -v "^W0000\|^I0000" | tail -5
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
  timeout 100 $T --presets=hope_340m --set=num_layers=4,memory.chunk_size_other=16,memory.chunk_size=64 \
  --out=$OUT/hope4_cmdbuf.json 2>&1 | grep -v "^W0000\|^I0000" | tail -6
