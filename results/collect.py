"""Summarize the GPU runs kept under results/gpu/<batch>/<run>/metrics.json into results/gpu/summary.json,
the file the docs' results tables cite (tests/test_docs.py checks every number against it).

  python results/collect.py

Each batch folder holds the command file that produced it (cmd*.sh) and a notes.json saying which runs
shared the GPU. Numbers are copied from the runs' own metrics.json, rounded for the tables."""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def summarize(metrics):
    final, epochs = metrics.get("final") or {}, metrics["epochs"]
    last = epochs[-1]
    return {
        "example": metrics["example"],
        "epochs": len(epochs),
        "completed": bool(final),
        "dtype": final.get("dtype"),
        "global_batch": final.get("global_batch_size"),
        "test_accuracy": round(final.get("test_accuracy", last["test_accuracy"]), 2),
        "train_accuracy": round(final.get("train_accuracy", last["train_accuracy"]), 2),
        "best_val_accuracy": None if final.get("best_val_accuracy") is None else round(final["best_val_accuracy"], 2),
        "final_train_loss": round(last["train_loss"], 4),
        "wall_time_s": None if "wall_time_s" not in final else round(final["wall_time_s"], 1),
        "mean_epoch_s": round(sum(e["epoch_time_s"] for e in epochs) / len(epochs), 2),
        "mean_images_per_s": round(sum(e["images_per_s"] for e in epochs) / len(epochs)),
    }


def main():
    out = {}
    for batch in sorted(p for p in (HERE / "gpu").iterdir() if p.is_dir()):
        notes = json.loads((batch / "notes.json").read_text()) if (batch / "notes.json").exists() else {}
        for m in sorted(batch.glob("*/metrics.json")):
            row = summarize(json.loads(m.read_text()))
            row["batch"], row["note"] = batch.name, notes.get(m.parent.name, notes.get("*", ""))
            out[m.parent.name] = row
    (HERE / "gpu" / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"{len(out)} runs -> {HERE / 'gpu' / 'summary.json'}")


if __name__ == "__main__":
    main()
