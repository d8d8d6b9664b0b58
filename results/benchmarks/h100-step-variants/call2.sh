# Issue 25: lean device-side check, cudnn.benchmark, compile; batch 1024.
set -uo pipefail
source .gpu/gpu-env.sh || exit 1
R=/tmp/r2; mkdir -p $R
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; git log --oneline -1; } > $R/gpu.txt
cat $R/gpu.txt
F=.gpu/bench/02dev/ds_config_fast_fused.json
F1024=.gpu/bench/02dev/ds_config_fast_fused_b1024.json
t0=$(date +%s)
pack() { tar czf $OUT/r2.tgz -C /tmp --exclude=checkpoints r2; }
deepspeed --num_gpus=1 02_cifar10/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
  --deepspeed_config 02_cifar10/ds_config_fast.json --epochs 2 --output-dir /tmp/warm > $R/warm.log 2>&1
echo "warm-up rc=$? at $(( $(date +%s) - t0 )) s"
S() { out=$1; shift; python3 benchmarks/speed.py step --out $R/step/$out --epochs 6 --flags "--label-smoothing 0.1" "$@" > $R/step_$out.log 2>&1; echo "$out rc=$? at $(( $(date +%s) - t0 )) s"; grep '^{' $R/step_$out.log | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print({k: round(v,3) for k,v in d.items() if k.endswith('ms')})"; pack; }
S cur_fused --config $F
S dev2 --config $F --script .gpu/bench/02dev2/train_ds.py
S dev2cudnn --config $F --script .gpu/bench/02dev2cudnn/train_ds.py
S cur_fused_again --config $F
S dev2cudnn_b1024 --config $F1024 --script .gpu/bench/02dev2cudnn/train_ds.py
S dev2cudnn_compile --config $F --script .gpu/bench/02dev2cudnn/train_ds.py --compile
L() { name=$1; cfg=$2; ep=$3; seed=$4
  python3 benchmarks/phases.py --out $R/$name -- deepspeed --num_gpus=1 .gpu/bench/02dev2cudnn/train_ds.py --dataset imagefolder \
    --data-dir /tmp/cifar10-jpeg --deepspeed_config $cfg --epochs $ep --label-smoothing 0.1 --tta-flip \
    --seed $seed --output-dir {run_dir} > $R/$name.txt 2>&1
  echo "$name rc=$? at $(( $(date +%s) - t0 )) s: $(grep -h 'test accuracy' $R/$name/run1.log | tail -1 | cut -c1-90) | $(grep launcher_exit $R/$name/phases.md)"
  pack; }
L b1024-e50-s1 $F1024 50 1
L b1024-e50-s2 $F1024 50 2
L b512-e50-s1 $F 50 1
