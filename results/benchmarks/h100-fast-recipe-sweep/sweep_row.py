"""Append one run's row to $OUT/runs.jsonl: sweep_row.py NAME EPOCHS SEED DTYPE CONFIG RC T0 T1 RUNDIR"""
import json
import os
import statistics
import sys

name, epochs, seed, dtype, config, rc, t0, t1, run = sys.argv[1:10]
row = {"name": name, "epochs": int(epochs), "seed": int(seed), "dtype": dtype, "config": config,
       "rc": int(rc), "launcher_to_exit_s": round(float(t1) - float(t0), 2)}
try:
    m = json.load(open(f"{run}/metrics.json"))
    f = m["final"] or {}
    ep = [e["epoch_time_s"] for e in m["epochs"] if "epoch_time_s" in e]
    row.update(test_accuracy=f.get("test_accuracy"), best_test_accuracy=f.get("best_test_accuracy"),
               epochs_completed=f.get("epochs_completed"), script_wall_s=round(f.get("wall_time_s", 0), 2),
               epoch_s_median_2plus=round(statistics.median(ep[1:]), 4) if len(ep) > 1 else None,
               epoch_s_first=round(ep[0], 3) if ep else None,
               final_optimizer=m.get("config", {}).get("optimizer"))
except Exception as e:  # noqa: BLE001
    row["error"] = repr(e)[:200]
with open(os.environ["OUT"] + "/runs.jsonl", "a") as out:
    out.write(json.dumps(row) + "\n")
print("ROW", json.dumps({k: row.get(k) for k in ("name", "rc", "launcher_to_exit_s", "test_accuracy",
                                                 "epoch_s_median_2plus", "script_wall_s")}), flush=True)
