#!/usr/bin/env bash
# The GPU checks a session with a device machine should run, as one time-boxed script
# (the device tool lends about 15 minutes in all): convergence of the models the CPU
# cannot converge (issue 5), then fractional-GPU packing of a real sweep (issue 3).
#
#   MINUTES=2 bash bench/gpu_checks.sh        # per-model time box in minutes (default 2)
#
# The device image lacks Ray and a few other dependencies, and the real data lives outside the
# repository: `bash bench/gpu_prepare.sh` here first, then carry .gpu (the command is in that
# script's header). On an H200 (2026-12-04) the whole script took about 5.5 minutes with
# MINUTES=2, and the models converge inside their boxes (SASRec ML-1M about 0.8 s an epoch,
# BERT4Rec 0.3 s, LightGCN Gowalla 2.3 s).
#
# Figures go to stdout and, as JSON, to $OUT (default /tmp/rayrec-gpu). Needs a Python with
# rayrec's dependencies and a CUDA torch; PYTHON overrides the interpreter (default .venv's,
# else python3). Nothing here decides pass/fail.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rayrec-gpu}
MINUTES=${MINUTES:-2}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# The shared trainer's speed on the GPU: one epoch per model, rayrec's side only (the plain
# references of bench/speed.py run on CPU).
"$PY" bench/speed.py --device cuda --no-reference --json "$OUT/speed.json"
# SASRec with the default recipe to early stopping (issue 11), then BERT4Rec with patience 60
# (patience 20 stops it early on 512 noisy validation users; docs/benchmarks.md).
"$PY" bench/seq_ml1m.py --model sasrec --epochs 400 --max-minutes "$MINUTES" \
    --set train.device=cuda --json "$OUT/sasrec.json"
"$PY" bench/seq_ml1m.py --model bert4rec --epochs 800 --max-minutes "$MINUTES" --batch-size 256 \
    --set train.device=cuda --set train.patience=60 --json "$OUT/bert4rec.json"
# LightGCN on Gowalla (converges in hundreds of epochs; Recall@20 is printed as it goes).
"$PY" bench/graph_gowalla.py --model lightgcn --epochs 1000 --max-minutes "$MINUTES" --eval-every 10 \
    --set train.device=cuda --json "$OUT/lightgcn.json"
# Four trials at 0.25 GPU on one real GPU: utilisation and start overhead of the packed sweep.
"$PY" bench/sweep_overhead.py --trials 8 --epochs 6 --gpus-per-trial 0.25 --json "$OUT/packing.json"
# EASE and ALS fit on the trial's device (issue 13): the float64 solve and the batched
# conjugate-gradient sweeps on the GPU, with their seconds, against the CPU figures in
# docs/benchmarks.md. EASE on Gowalla (40,981 items: 34 GB of solve, refused on a 24 GB CPU
# machine) fits in an H200's memory.
for model in ease als; do
  "$PY" -m rayrec train "$model" --data ml-1m-gsasrec --no-progress --set train.device=cuda \
      --output "$OUT/$model-ml1m" || true
done
"$PY" -m rayrec train ease --data gowalla --no-progress --set train.device=cuda --output "$OUT/ease-gowalla" || true
