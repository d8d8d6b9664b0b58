# One after run and the baseline (code at 50805c1, 80 epochs unfused) in one call, on one machine.
set -uo pipefail
source .gpu/gpu-env.sh || exit 1
R=/tmp/r25b; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
t0=$(date +%s)
pack() { tar czf $OUT/r25b.tgz -C /tmp --exclude=checkpoints r25b; }
# the old script's decoded cache has another format: it gets its own copy of the images (hard links)
rm -rf /tmp/cifar10-jpeg-old && cp -al /tmp/cifar10-jpeg /tmp/cifar10-jpeg-old && find /tmp/cifar10-jpeg-old -maxdepth 1 -name '.decoded-*' -delete
deepspeed --num_gpus=1 02_cifar10/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
  --deepspeed_config 02_cifar10/ds_config_fast.json --epochs 1 --output-dir /tmp/warm > $R/warm.log 2>&1
echo "warm-up rc=$? at $(( $(date +%s) - t0 )) s"
python3 benchmarks/phases.py --runs 1 --out $R/after --command-file .gpu/bench/seeds.sh > $R/after.txt 2>&1
echo "after rc=$? at $(( $(date +%s) - t0 )) s: $(grep launcher_exit $R/after/phases.md)"; pack
deepspeed --num_gpus=1 .gpu/bench/02before/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg-old \
  --deepspeed_config .gpu/bench/02before/ds_config_fast.json --epochs 1 --output-dir /tmp/warm-before > $R/warm-before.log 2>&1
echo "warm-up of the old script rc=$? at $(( $(date +%s) - t0 )) s"
python3 benchmarks/phases.py --runs 1 --out $R/before --command-file .gpu/bench/before.sh > $R/before.txt 2>&1
echo "before rc=$? at $(( $(date +%s) - t0 )) s: $(grep launcher_exit $R/before/phases.md)"; pack
