"""The floor for 01's speed target: a plain PyTorch loop (no DeepSpeed) on 01's model, synthetic data and
GPU-resident batches (DeviceBatches from 01_basic_convnet/train_ds.py), Adam lr 1e-3, batch 32, for a few
epochs; prints one JSON line with the training step time and the 50-epoch time it implies.

  python3 benchmarks/plain_01.py [--epochs 5] [--dtype fp32|bf16|fp16]

fp16/bf16 run under torch.autocast (fp16 with a GradScaler), the cheapest mixed precision torch offers."""

import argparse
import json
import time

import torch
from plain_loop import load_example


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    a = ap.parse_args()
    ex = load_example("01_basic_convnet")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_x, train_y = ex.synthetic_digits(10_000, 42, 1)
    torch.manual_seed(0)
    model = ex.CNNModelEnhanced().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    scaler = torch.amp.GradScaler(enabled=a.dtype == "fp16")
    batches = ex.DeviceBatches(train_x, train_y, 32, torch.float32, 0, 1, device, shuffle=True, seed=42)
    times, steps = [], 0
    for epoch in range(a.epochs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sums = torch.zeros(2, device=device)
        for x, y in batches.epoch(epoch):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sums += torch.stack([loss.detach(), torch.ones((), device=device)])
            steps += 1
        sums.tolist()  # one host read per epoch, as in the examples
        times.append(time.perf_counter() - t0)
    per_epoch = sorted(times[1:] or times)[len(times[1:] or times) // 2]
    print(json.dumps({"part": "plain_01", "dtype": a.dtype, "device": str(device), "batch": 32,
                      "steps_per_epoch": len(batches), "epoch_s_median": per_epoch,
                      "step_ms": 1000 * per_epoch / len(batches), "implied_50_epochs_s": 50 * per_epoch}))


if __name__ == "__main__":
    main()
