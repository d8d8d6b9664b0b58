#!/usr/bin/env bash
# Re-measure result folders on a GPU machine, from the repository root:
#   DEST=/somewhere results/measure.sh results/02_cifar10/h200-fast-fp32 ...
# For each folder: runs its command.sh through the `deepspeed` launcher (as many times as its
# "repeats:" comment says) and writes DEST/<folder>/ with console.log (step lines trimmed,
# warnings kept), metrics.json and curves.png of the median run, and timing.json with every run's
# launcher-to-exit seconds, the script's own wall seconds and test accuracy. DEST defaults to the
# folders themselves. Run one warm-up first (WARMUP=1, the default): the first process on a fresh
# machine compiles bytecode and decodes the JPEGs once, which later runs reuse.
# A command.sh that reads SEED runs its k-th repeat with the k-th of "seeds: 1 2 42" in its comments.
# PARALLEL=1 starts a folder's runs at once (small CPU-bound runs sharing one GPU): timing.json then
# says "concurrent", since each run's time includes waiting for the others.
set -uo pipefail
DEST=${DEST:-.}
if [ "${WARMUP:-1}" = 1 ]; then
  t0=$(date +%s.%N)
  deepspeed --num_gpus=1 02_cifar10/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
    --epochs 1 --output-dir /tmp/warmup-$$ > /tmp/warmup-$$.log 2>&1
  echo "warm-up: rc=$? $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
fi
for dir in "$@"; do
  dir=${dir%/}; out="$DEST/$dir"; mkdir -p "$out"
  repeats=$(grep -o 'repeats: [0-9]*' "$dir/command.sh" | grep -o '[0-9]*$' || true)
  seeds=($(grep -o 'seeds: [0-9 ]*' "$dir/command.sh" | cut -d: -f2 || true))
  runs=()
  for i in $(seq 1 "${repeats:-1}"); do
    run=/tmp/measure-$$/$dir/run$i; rm -rf "$run"; mkdir -p "$(dirname "$run")"
    one() {
      local t0 t1 rc seed=${seeds[$(($1 - 1))]:-}
      t0=$(date +%s.%N)
      RUN_DIR=$2 SEED=$seed bash "$dir/command.sh" > "$2.log" 2>&1; rc=$?
      t1=$(date +%s.%N)
      echo "{\"run\": $1, \"seed\": ${seed:-null}, \"rc\": $rc, \"launcher_to_exit_s\": $(python3 -c "print(round($t1 - $t0, 1))")}" \
        > "$2.time"
      echo "$dir run $1: rc=$rc $(cat "$2.time")"
    }
    if [ "${PARALLEL:-0}" = 1 ]; then one "$i" "$run" & else one "$i" "$run"; fi
    runs+=("$run")
  done
  wait
  PARALLEL=${PARALLEL:-0} python3 - "$out" "${runs[@]}" <<'PY'
import json, os, re, shutil, statistics, sys
out, runs = sys.argv[1], sys.argv[2:]
rows = []
for r in runs:
    t = json.load(open(r + ".time"))
    try:
        f = json.load(open(r + "/metrics.json"))["final"] or {}
    except (OSError, ValueError, KeyError):
        f = {}
    t.update(script_wall_s=round(f.get("wall_time_s", float("nan")), 1),
             test_accuracy=f.get("test_accuracy"), epochs=f.get("epochs_completed"))
    rows.append((r, t))
ok = [x for x in rows if x[1]["rc"] == 0] or rows
# seeds: the run of the median accuracy (seeds move a small-batch run by points); else of median time
seeded = any(t.get("seed") is not None for _, t in ok)
by = "test_accuracy" if seeded else "launcher_to_exit_s"
median = sorted(ok, key=lambda x: x[1][by] or 0)[(len(ok) - 1) // 2][0]
json.dump({"median_run": rows.index(next(x for x in rows if x[0] == median)) + 1,
           "concurrent": os.environ["PARALLEL"] == "1", "runs": [t for _, t in rows]},
          open(out + "/timing.json", "w"), indent=1)
for name in ("metrics.json", "curves.png"):
    try:
        shutil.copy(f"{median}/{name}", f"{out}/{name}")
    except OSError:
        pass
step = re.compile(r"^(\[rank\d+\]:)?\s+step +\d+ \| |\[launch\.py:145:main\] \d+ N")
with open(median + ".log") as src, open(out + "/console.log", "w") as dst:
    dst.writelines(line for line in src if not step.match(line))
print(" ", out, json.dumps([t for _, t in rows]))
PY
done
