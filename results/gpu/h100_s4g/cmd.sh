#!/usr/bin/env bash
# Session-4 GPU command G (results/gpu/h100_s4g/cmd.sh): cProfile of 01 (3 epochs) with its shipped config
# (fp16, ZeRO-1) and with fp32 without ZeRO, to see where DeepSpeed's per-step time goes at batch 32.
set -u
R=/tmp/r4g; mkdir -p $R
unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pyc4g
python3 -c 'import json; c = json.load(open("01_basic_convnet/ds_config.json")); c.pop("zero_optimization"); json.dump(c, open("/tmp/z0.json", "w"))'
for v in "z1 fp16 01_basic_convnet/ds_config.json" "z0 fp32 /tmp/z0.json"; do
  set -- $v
  python3 -m cProfile -o $R/p01_$1.prof 01_basic_convnet/train_ds.py --deepspeed_config $3 --dtype $2 --epochs 3 --output-dir $R/o_$1 > $R/01_$1.log 2>&1
  echo "01 $1 $2 rc=$?: $(grep -E '^epoch +[23]/' $R/01_$1.log | sed -E 's/.*\| ([0-9.]+s [0-9,]+ img\/s)$/\1/' | tr '\n' ' ')" >> $R/status.txt
  python3 -c "import pstats; s = pstats.Stats('$R/p01_$1.prof'); s.sort_stats('tottime').print_stats(30); s.sort_stats('cumulative').print_stats('deepspeed', 40)" > $R/p01_$1.txt 2>&1
done
rm -rf $R/*.prof $R/o_*
tar -czf $OUT/s4g.tgz -C $R .
cp $R/status.txt $OUT/
