"""Seed 002's training pipeline as written, rebuilt for timing (the baseline that 02_cifar10 replaces).

What is reproduced, from the seed's README (/work/shared/seeds/002_*.txt) and the NaN checks of seed 004:
- data: CIFAR-10 held in memory as uint8 HWC arrays, one PIL image per sample (the same
  `__getitem__` as torchvision.datasets.CIFAR10), RandomCrop(32, padding=4) + RandomHorizontalFlip +
  ToTensor + Normalize, fed by `DataLoader(batch_size=32, shuffle=True, num_workers=2)`; workers
  start afresh every epoch (no persistent_workers), as in the seed;
- model: the seed's CIFAR10CNNEnhanced (268,746 parameters), taken from 02_cifar10, which ships it as written;
- engine: deepspeed.initialize with the seed's ds_config.json (SGD lr 0.01 momentum 0.9, clipping 1.0,
  fp32, no ZeRO); LR set by hand once per epoch (warmup + cosine, `get_lr_schedule`);
- per step: `torch.isfinite(loss)` check, the per-parameter `.item()` gradient-norm loop, the
  non-finite-norm check, engine.step(), `calculate_accuracy` (`.item()`), `loss.item()` and the
  correct-count `.item()` accumulations, and a step line every 100 steps (written to `log`).
Left out: W&B calls (off without WANDB_API_KEY in the seed too) and the seed's test pass (it reports
train accuracy), so the seed's epoch time here is, if anything, an underestimate.
"""

import copy
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms as transforms
from plain_loop import load_example
from torch.utils.data import DataLoader, Dataset

SEED_CONFIG = {  # the seed's ds_config.json, verbatim
    "train_batch_size": 32,
    "train_micro_batch_size_per_gpu": 32,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}},
    "gradient_clipping": 1.0,
    "fp16": {"enabled": False},
}
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


# ============================================================================ model
# The seed's CIFAR10CNNEnhanced is the class 02_cifar10 ships (same layers and init); use that one, so the
# comparison is on the same model by construction.
CIFAR10CNNEnhanced = load_example("02_cifar10").CIFAR10CNNEnhanced


def get_lr_schedule(epoch, initial_lr=0.001, warmup_epochs=5, total_epochs=50):
    if epoch < warmup_epochs:
        return initial_lr * (epoch + 1) / warmup_epochs
    progress = (epoch - warmup_epochs) / (total_epochs - warmup_epochs)
    return initial_lr * 0.5 * (1 + torch.cos(torch.tensor(progress * 3.14159)).item())


def calculate_accuracy(outputs, targets):
    predictions = torch.argmax(outputs, dim=1)
    correct = (predictions == targets).sum().item()
    return (correct / targets.size(0)) * 100.0


# ============================================================================ data
class InMemoryCIFAR(Dataset):
    """torchvision.datasets.CIFAR10's sample path: uint8 HWC array -> PIL image -> transform."""

    def __init__(self, data, targets, transform):
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        from PIL import Image

        img, target = Image.fromarray(self.data[index]), int(self.targets[index])
        return self.transform(img), target


def train_loader(data, targets, batch_size=32, num_workers=2):
    """The seed's training DataLoader over the seed's training transforms."""
    transform_train = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    return DataLoader(InMemoryCIFAR(data, targets, transform_train), batch_size=batch_size, shuffle=True,
                      num_workers=num_workers)


def load_jpeg_split(root, split, threads=16):
    """root/split/<class>/*.jpg as (uint8 [N, 32, 32, 3] numpy, int64 [N] numpy); classes in sorted order,
    like 02's --dataset imagefolder. Decoding runs in threads (PIL releases the GIL while decoding)."""
    from PIL import Image

    d = os.path.join(root, split)
    classes = sorted(c for c in os.listdir(d) if os.path.isdir(os.path.join(d, c)))
    files = [(os.path.join(d, c, f), label) for label, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(d, c))) if not f.startswith(".")]

    def read(path):
        with Image.open(path) as im:
            im = im.convert("RGB")
            return np.asarray(im if im.size == (32, 32) else im.resize((32, 32), Image.BILINEAR))

    with ThreadPoolExecutor(threads) as ex:
        images = np.stack(list(ex.map(read, [p for p, _ in files], chunksize=256)))
    return images, np.array([label for _, label in files], dtype=np.int64)


def synthetic_split(n, seed):
    """n random uint8 HWC images and labels: enough to time the pipeline offline, not to learn from."""
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), g.integers(0, 10, n).astype(np.int64)


# ============================================================================ engine and loop
def make_engine():
    """The seed's model in a DeepSpeed engine with the seed's config (needs torch.distributed up)."""
    import deepspeed

    model = CIFAR10CNNEnhanced()
    config = copy.deepcopy(SEED_CONFIG)  # DeepSpeed may fill in the dict it is given
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def run_epoch(model_engine, loader, device, epoch=0, max_steps=0, log=None):
    """One epoch of the seed's training loop as written (or its first max_steps steps).
    Returns steps run, seconds to the first finished step (includes worker start-up) and total seconds."""
    criterion = nn.CrossEntropyLoss()
    for param_group in model_engine.optimizer.param_groups:  # the seed's manual per-epoch LR
        param_group["lr"] = get_lr_schedule(epoch, initial_lr=0.01, warmup_epochs=5, total_epochs=50)
    model_engine.train()
    epoch_loss_sum, epoch_correct, epoch_total, epoch_grad_norms = 0.0, 0, 0, []
    steps, t_first, t0 = 0, None, time.perf_counter()
    for batch_idx, (inputs, labels) in enumerate(loader):
        inputs, labels = inputs.to(device), labels.to(device)
        outputs = model_engine(inputs)
        loss = criterion(outputs, labels)
        if not torch.isfinite(loss):
            continue
        model_engine.backward(loss)
        total_norm = 0.0
        for p in model_engine.module.parameters():
            if p.grad is not None:
                param_norm = p.grad.data.norm(2)
                total_norm += param_norm.item() ** 2
        total_norm = total_norm ** 0.5
        if not torch.isfinite(torch.tensor(total_norm)):
            model_engine.module.zero_grad()
            continue
        model_engine.step()
        batch_acc = calculate_accuracy(outputs, labels)
        epoch_loss_sum += loss.item()
        epoch_correct += (torch.argmax(outputs, dim=1) == labels).sum().item()
        epoch_total += labels.size(0)
        epoch_grad_norms.append(total_norm)
        if batch_idx % 100 == 0 and log:
            log(f"   Step {batch_idx:4d} | Loss: {loss.item():.6f} | Acc: {batch_acc:.2f}% | Grad Norm: {total_norm:.6f}")
        steps += 1
        if t_first is None:
            t_first = time.perf_counter() - t0
        if max_steps and steps >= max_steps:
            break
    return {"steps": steps, "first_step_s": t_first or 0.0, "total_s": time.perf_counter() - t0,
            "train_accuracy": 100.0 * epoch_correct / max(epoch_total, 1), "loss": epoch_loss_sum / max(steps, 1)}


def epoch_estimate(timing, steps_per_epoch):
    """Seconds for a full epoch: measured if the run covered one, else first step (worker start-up) plus
    the steady per-step time of the remaining measured steps times the remaining steps of the epoch."""
    if timing["steps"] >= steps_per_epoch:
        return timing["total_s"], False
    per_step = (timing["total_s"] - timing["first_step_s"]) / max(timing["steps"] - 1, 1)
    return timing["first_step_s"] + per_step * (steps_per_epoch - 1), True


def steps_per_epoch(n_images, batch_size=32):
    return math.ceil(n_images / batch_size)
