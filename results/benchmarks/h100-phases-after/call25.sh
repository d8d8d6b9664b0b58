# Issue 25's after table: one baseline run of the code before, then the new recipe over seeds 1, 2, 42.
set -uo pipefail
source .gpu/gpu-env.sh || exit 1
R=/tmp/r25; mkdir -p $R
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; git log --oneline -1; } > $R/gpu.txt
t0=$(date +%s)
pack() { tar czf $OUT/r25.tgz -C /tmp --exclude=checkpoints r25; }
deepspeed --num_gpus=1 02_cifar10/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
  --deepspeed_config 02_cifar10/ds_config_fast.json --epochs 1 --output-dir /tmp/warm > $R/warm.log 2>&1
echo "warm-up rc=$? at $(( $(date +%s) - t0 )) s"
deepspeed --num_gpus=1 .gpu/bench/02before/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
  --deepspeed_config .gpu/bench/02before/ds_config_fast.json --epochs 1 --output-dir /tmp/warm-before > $R/warm-before.log 2>&1
echo "warm-up of the old script rc=$? at $(( $(date +%s) - t0 )) s"
python3 benchmarks/phases.py --runs 1 --out $R/before --command-file .gpu/bench/before.sh > $R/before.txt 2>&1
echo "before rc=$? at $(( $(date +%s) - t0 )) s: $(grep launcher_exit $R/before/phases.md)"; pack
python3 benchmarks/phases.py --runs 3 --out $R/after --command-file .gpu/bench/seeds.sh > $R/after.txt 2>&1
echo "after rc=$? at $(( $(date +%s) - t0 )) s: $(grep launcher_exit $R/after/phases.md)"; pack
grep -h "test accuracy" $R/after/run*.log
