#!/usr/bin/env bash
# GPU runs for 03_cifar10_basic's README "Results" (lead runs this on an H100 box).
# Needs: torch + torchvision + deepspeed, CIFAR-10 as JPEGs in /tmp/cifar10-jpeg/{train,test}/<class>/,
# and $OUT (outputs: $OUT/03/<name>/ and logs $OUT/03_<name>.log).
#   OUT=/path/to/out bash benchmarks/gpu_runs_03.sh
# 1. a 2,000-step run to time one step (batch 4: 12,500 steps per epoch on 1 GPU),
# 2. the seed's default 2-epoch run, 3. 20 epochs with each config, the three at once in the background.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${OUT:?set OUT to the output folder}"
DATA=/tmp/cifar10-jpeg
mkdir -p "$OUT/03"

summary() {  # name: one line from metrics.json
  python - "$OUT/03/$1/metrics.json" "$1" <<'PY'
import json, sys
try:
    m = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    print(f"{sys.argv[2]:10s} no metrics.json ({e})"); sys.exit()
f, ep = m.get("final") or {}, m["epochs"]
per_step = sum(e["epoch_time_s"] for e in ep) / max(1, sum(e["train_images"] for e in ep)) * m["config"]["train_micro_batch_size_per_gpu"] * m["world_size"]
print(f"{sys.argv[2]:10s} epochs {len(ep):2d} | test acc {f.get('test_accuracy', ep[-1]['test_accuracy']):.2f}% "
      f"(best {f.get('best_test_accuracy', float('nan')):.2f}%) | train acc {ep[-1]['train_accuracy']:.2f}% "
      f"| wall {f.get('wall_time_s', float('nan')):.0f}s | {1000 * per_step:.2f} ms/step | "
      f"{sum(e['images_per_s'] for e in ep) / len(ep):,.0f} img/s | dtype {f.get('dtype')}")
PY
}

run() {  # name config extra-args...
  local name=$1 cfg=$2; shift 2
  local port=$((29500 + RANDOM % 1000))
  deepspeed --num_gpus=1 --master_port=$port "$HERE/train_ds.py" --deepspeed --deepspeed_config "$HERE/$cfg" \
    --dataset imagefolder --data-dir "$DATA" --output-dir "$OUT/03/$name" "$@" > "$OUT/03_$name.log" 2>&1
  echo "$name: exit $?"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"

t0=$(date +%s)
run steptime ds_config.json --epochs 1 --max-steps 2000 --log-interval 500
summary steptime
echo "  -> 20 epochs x 12,500 steps at this rate: $(python -c "
import json; m = json.load(open('$OUT/03/steptime/metrics.json')); e = m['epochs'][0]
print(f\"{e['epoch_time_s'] / 2000 * 12500 * 20 / 60:.0f} min\")")"

run default_2ep ds_config.json
summary default_2ep

for name in default zero2 fp16; do
  cfg=ds_config.json; [ $name != default ] && cfg=ds_config_$name.json
  run ${name}_20ep $cfg --epochs 20 --log-interval 2500 &
done
wait
for name in default zero2 fp16; do summary ${name}_20ep; done
echo "total $(( $(date +%s) - t0 ))s"
