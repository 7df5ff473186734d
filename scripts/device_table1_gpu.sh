#!/usr/bin/env bash
# Table 1 (Kvasir-SEG) at the paper's recipe cut to what one 10-minute call on a lent GPU affords
# (setting gpu_25 of configs/experiments/table1_kvasir.yaml). Run from the repository root of a
# GPU machine whose python3 has CUDA PyTorch; the data is a copy packed here beforehand:
#
#   python scripts/pack_kvasir_for_device.py ../shared/datasets/kvasir-seg .gpudata/kvasir-seg
#   # wheels of the packages that machine lacks (monai, albumentations ...) in .whl/, if any
#   OUT=/some/folder bash scripts/device_table1_gpu.sh
#
# Two `lmnet experiment` processes share the matrix: each trains the next run that the other does
# not hold (a run's lock), so the baselines train while LM-Net does. Each run stops at the
# setting's budget_minutes; the call stops cleanly after MINUTES. Writes to $OUT: machine.txt,
# worker1.log, worker2.log, results.tgz (tables, figures, run logs and evaluations; no checkpoint),
# lmnet_gpu/ (LM-Net's best checkpoint as a pretrained folder: config.json, fp16 safetensors, card).
set -uo pipefail
CONFIG=${CONFIG:-configs/experiments/table1_kvasir.yaml}
SETTING=${SETTING:-gpu_25}
DATA=${DATA:-.gpudata/kvasir-seg}
MINUTES=${MINUTES:-7}
PY=${PY:-python3}
: "${OUT:?set OUT to a folder for the results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
if [ "${WHEELS:-1}" = 1 ] && compgen -G ".whl/*.whl" > /dev/null; then  # WHEELS=0: skip
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c "import torch, monai, albumentations; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'monai', monai.__version__, 'albumentations', albumentations.__version__)"
  git log -1 --format='commit %H' 2>/dev/null; } > "$OUT/machine.txt" 2>&1
run() { "$PY" -m lmnet experiment "$CONFIG" --setting "$SETTING" --data "$DATA" "$@"; }
run --quiet --time-budget "$MINUTES" > "$OUT/worker1.log" 2>&1 &
first=$!
sleep 20  # the first worker takes the first run (LM-Net, the longest); the second the next ones
run --quiet --time-budget "$MINUTES" > "$OUT/worker2.log" 2>&1
wait "$first"
run --tables-only >> "$OUT/worker1.log" 2>&1
name=$("$PY" -c "from lmnet.engine.experiments import load_experiment as l; c = l('$CONFIG', '$SETTING'); print(c.out + '/' + c.name, c.runs)")
read -r table runs <<< "$name"
tar czf "$OUT/results.tgz" --exclude='checkpoint_*.pt' --exclude='tb' --exclude='.lock' "$table" "$runs"
"$PY" -m lmnet export "$runs/lmnet_s0" --format pretrained --out "$OUT/lmnet_gpu" >> "$OUT/worker1.log" 2>&1
ls -la "$OUT"
