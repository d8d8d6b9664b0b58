# 02 fast recipe with fused SGD: epochs x seeds 1, 2, 42 (bisection from 60), then 10-epoch fp32 vs bf16.
set -uo pipefail
T0=$(date +%s.%N)
B=${BUDGET:-400}   # seconds from T0 this script may spend
source .gpu/gpu-env.sh || exit 1
L=/tmp/swlogs; mkdir -p $L
el() { python3 -c "print(int($(date +%s.%N) - $T0))"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  python3 -c 'import sys, torch; print(sys.version.split()[0], torch.__version__)'; } > $OUT/gpu.txt
cat $OUT/gpu.txt
bash results/measure.sh 2>&1 | tee $L/warmup.txt
echo "setup+warm-up done at $(el) s"
FUSED=.gpu/bench/ds_config_fast_fused.json
SHIPPED=02_cifar10/ds_config_fast.json
# run NAME EPOCHS SEED DTYPE CONFIG: returns 0 if it ran and reached >= 80%, 1 if below, 2 if skipped
run() {
  local name=$1 epochs=$2 seed=$3 dtype=$4 cfg=$5 per=0.55
  [ "$dtype" = bf16 ] && per=0.9
  local est=$(python3 -c "print(int(16 + $per * $epochs))") now=$(el)
  if [ $((now + est)) -gt $B ]; then echo "SKIP $name (at $now s, needs ~$est s)"; return 2; fi
  local extra=(); [ "$dtype" = bf16 ] && extra=(--dtype bf16)
  local t0=$(date +%s.%N)
  deepspeed --num_gpus=1 02_cifar10/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
    --deepspeed_config $cfg --epochs $epochs --label-smoothing 0.1 --tta-flip --seed $seed \
    ${extra[@]+"${extra[@]}"} --output-dir /tmp/sw/$name > $L/$name.raw 2>&1
  local rc=$? t1=$(date +%s.%N)
  grep -Ev '^(\[rank[0-9]+\]:)?\s+step +[0-9]+ \| |\[launch\.py:145:main\] [0-9]+ N' $L/$name.raw > $L/$name.log
  rm -f $L/$name.raw
  python3 .gpu/bench/sweep_row.py $name $epochs $seed $dtype $cfg $rc $t0 $t1 /tmp/sw/$name
  tar czf $OUT/logs.tgz -C /tmp swlogs
  python3 -c "import json,sys; r=[json.loads(l) for l in open('$OUT/runs.jsonl')][-1]; sys.exit(0 if (r.get('test_accuracy') or 0) >= 80 else 1)"
}
# level EPOCHS: seeds 1, 2, 42 in turn, stopping at the first below 80%; 0 = all >= 80%
level() {
  local s
  for s in 1 2 42; do run e$1-s$s $1 $s fp32 $FUSED; local r=$?; [ $r -ne 0 ] && return $r; done
  return 0
}
if level 60; then
  if level 50; then
    level 40 || level 45
  else level 55; fi
else
  if level 70; then level 65; else level 80; fi
fi
run b10-fp32 10 42 fp32 $SHIPPED
run b10-bf16 10 42 bf16 $SHIPPED
echo "all done at $(el) s"
