"""A plain PyTorch training loop (no DeepSpeed) over 02_cifar10's own model and data path, for timing.

Reuses 02_cifar10/train_ds.py through importlib: CIFAR10CNNEnhanced, DeviceBatches with augment
(dataset resident on the device as uint8, crop + flip + normalize there) and the optimizer settings of
a DeepSpeed config (SGD with its params; gradient_clipping if > 0). The LR follows 02's linear warmup +
cosine per step. Like 02, losses and hits are summed on the device and read once per epoch, and each
epoch ends with a test pass at batch 1000, so "epoch time / steps" means the same thing as in 02's
metrics.json (epoch_time_s covers training and the test pass).
"""

import importlib.util
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def load_example(name):
    """Import <repo>/<name>/train_ds.py as a module (the example folders are not packages)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / name / "train_ds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def warmup_cosine(total_steps, warmup_steps):
    """LR factor per step: linear 0 -> 1 over warmup_steps, then cosine 1 -> 0 at total_steps."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


@torch.no_grad()
def test_accuracy(model, batches, tta_flip=False):
    model.eval()
    hits = torch.zeros((), device=batches.images.device, dtype=torch.float64)
    for x, y in batches.epoch(0):
        logits = model(x)
        if tta_flip:  # like 02's --tta-flip: average with the mirrored image's logits
            logits = (logits + model(x.flip(3))) / 2
        hits += (logits.argmax(1) == y).sum()
    model.train()
    return 100.0 * hits.item() / len(batches.labels)


def run(ex02, train, test, cfg, device, epochs, label_smoothing=0.0, warmup_epochs=5.0, max_steps=0, seed=42,
        tta_flip=False, skip_check=False):
    """Train 02's model with a plain loop. train/test: (uint8 [N, 3, 32, 32], int64 [N]) CPU tensors.
    skip_check=True adds 02's own non-finite check (fp32 without ZeRO): the global grad norm and one host
    read of isfinite(norm) per step, to measure what that check costs on its own.
    Returns per-epoch rows (steps, train_s, epoch_s incl. test pass, test_accuracy)."""
    torch.manual_seed(seed)
    model = ex02.CIFAR10CNNEnhanced().to(device)
    batch = cfg["train_micro_batch_size_per_gpu"]
    opt = torch.optim.SGD(model.parameters(), **cfg["optimizer"]["params"])
    clip = cfg.get("gradient_clipping", 0.0)
    train_b = ex02.DeviceBatches(*train, batch, torch.float32, 0, 1, device, shuffle=True, seed=seed,
                                 prepare=ex02.augment)
    test_b = ex02.DeviceBatches(*test, 1000, torch.float32, 0, 1, device, prepare=ex02.normalize)
    total = epochs * len(train_b)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, max(1, round(warmup_epochs * len(train_b)))))
    rows, done = [], 0
    for epoch in range(epochs):
        t0, steps = time.perf_counter(), 0
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
        for x, y in train_b.epoch(epoch):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if skip_check:
                norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
                if not torch.isfinite(norm):  # host read, as in 02
                    continue
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                 torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
            steps, done = steps + 1, done + 1
            if max_steps and done >= max_steps:
                break
        loss_sum, correct, n = sums.tolist()  # one host read per epoch
        train_s = time.perf_counter() - t0
        acc = test_accuracy(model, test_b, tta_flip)
        rows.append({"epoch": epoch + 1, "steps": steps, "train_s": train_s, "epoch_s": time.perf_counter() - t0,
                     "train_loss": loss_sum / n, "train_accuracy": 100.0 * correct / n, "test_accuracy": acc})
        if max_steps and done >= max_steps:
            break
    return rows
