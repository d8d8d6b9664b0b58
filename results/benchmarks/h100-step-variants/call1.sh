# Issue 25 exploration: step variants, then the 45-epoch recipe with the device-side check.
set -uo pipefail
source .gpu/gpu-env.sh || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; git log --oneline -1; } > $OUT/gpu.txt
cat $OUT/gpu.txt
FUSED=.gpu/bench/02dev/ds_config_fast_fused.json
DEV=.gpu/bench/02dev/train_ds.py
t0=$(date +%s)
deepspeed --num_gpus=1 02_cifar10/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
  --deepspeed_config 02_cifar10/ds_config_fast.json --epochs 2 --output-dir /tmp/warm > $OUT/warm.log 2>&1
echo "warm-up rc=$? at $(( $(date +%s) - t0 )) s"
S() { out=$1; shift; python3 benchmarks/speed.py step --out $OUT/step/$out --epochs 6 --flags "--label-smoothing 0.1" "$@" > $OUT/step_$out.log 2>&1; echo "$out rc=$? at $(( $(date +%s) - t0 )) s"; tail -1 $OUT/step_$out.log | cut -c1-600; }
S cur_unfused --config 02_cifar10/ds_config_fast.json
S cur_fused --config $FUSED
S cur_fused_nocheck --config $FUSED --variant no-check
S dev_fused --config $FUSED --script $DEV
S dev_fused_compile --config $FUSED --script $DEV --compile
for seed in 1 2 42; do
  python3 benchmarks/phases.py --out $OUT/e45-s$seed -- deepspeed --num_gpus=1 $DEV --dataset imagefolder \
    --data-dir /tmp/cifar10-jpeg --deepspeed_config $FUSED --epochs 45 --label-smoothing 0.1 --tta-flip \
    --seed $seed --output-dir {run_dir} > $OUT/e45-s$seed.txt 2>&1
  echo "e45 seed $seed rc=$? at $(( $(date +%s) - t0 )) s"
  grep -h "test accuracy\|launcher_exit" $OUT/e45-s$seed/run1.log $OUT/e45-s$seed/phases.md 2>/dev/null | tail -3
  rm -rf $OUT/e45-s$seed/runs/*/checkpoints
done
