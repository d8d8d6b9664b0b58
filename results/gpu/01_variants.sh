#!/usr/bin/env bash
# 01 per-epoch time under config variants, 3 epochs each on generated data (epochs 2 and 3 reported).
# Run on the GPU machine from the repo root with OUT set (results/gpu/h100_s4a/).
set -u
mkdir -p $OUT/var
python3 - <<'PY'
import json
base = json.load(open("01_basic_convnet/ds_config.json"))
def w(name, f):
    c = json.loads(json.dumps(base)); f(c); json.dump(c, open(f"/tmp/v_{name}.json", "w"))
w("z1", lambda c: None)
w("z0", lambda c: c.pop("zero_optimization"))
w("z0_fused", lambda c: (c.pop("zero_optimization"), c["optimizer"]["params"].update(fused=True)))
w("z1_fused", lambda c: c["optimizer"]["params"].update(fused=True))
PY
for v in "z1 fp16" "z1 fp32" "z0 fp32" "z0 bf16" "z0_fused fp32"; do
  set -- $v
  python3 01_basic_convnet/train_ds.py --deepspeed_config /tmp/v_$1.json --dtype $2 --epochs 3 --output-dir /tmp/var_$1_$2 > $OUT/var/$1_$2.log 2>&1
  echo "$1 $2: $(grep -E '^epoch +[23]/' $OUT/var/$1_$2.log | sed -E 's/.*\| ([0-9.]+s [0-9,]+ img\/s)$/\1/' | tr '\n' ' ') rc=$?"
done
