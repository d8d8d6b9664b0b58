#!/usr/bin/env bash
# GPU verification runs for 01_basic_convnet (run from the repo root on a CUDA box with deepspeed).
# LAUNCH overrides the launcher (e.g. LAUNCH=python3 where only the deepspeed module is installed).
# Writes logs and metrics under $OUT. Each 50-epoch run: ~30-70 s on one H100.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/01"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/01_hardware.txt"
for dtype in fp16 bf16 fp32; do
  cmd="${LAUNCH:-deepspeed --num_gpus=1} 01_basic_convnet/train_ds.py --dtype $dtype --output-dir $OUT/01/$dtype"
  echo "+ $cmd" | tee "$OUT/01_$dtype.log"
  t0=$(date +%s.%N); $cmd >> "$OUT/01_$dtype.log" 2>&1; t1=$(date +%s.%N)
  echo "01 $dtype: launcher wall $(python3 -c "print(round($t1 - $t0, 1))") s" | tee -a "$OUT/01_$dtype.log"
  python3 - "$OUT/01/$dtype/metrics.json" "$dtype" <<'PY'
import json, sys
m = json.load(open(sys.argv[1])); f = m["final"]
print(f"01 {sys.argv[2]}: test {f['test_accuracy']:.2f}% train {f['train_accuracy']:.2f}% loss {f['train_loss']:.4f} "
      f"epochs {f['epochs_completed']} wall {f['wall_time_s']:.1f}s "
      f"{sum(e['images_per_s'] for e in m['epochs'][1:]) / max(1, len(m['epochs']) - 1):,.0f} img/s")
PY
done
for dtype in fp16 bf16; do
  python3 tests/parity_check.py 01_basic_convnet --dtype $dtype 2>&1 | tail -1 | tee -a "$OUT/01_parity.log"
done
