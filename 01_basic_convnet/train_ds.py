"""Example 01: a two-layer CNN on 28x28 digits, trained with DeepSpeed, and the training features
a real run needs: Kaiming init, linear warmup + cosine decay, early stopping, gradient-norm and
accuracy tracking, loss-plateau notices, non-finite steps skipped, optional Weights & Biases,
and a quality rating of held-out test accuracy.

  deepspeed --num_gpus=1 train_ds.py                  # one GPU (or the CPU): generated digits
  deepspeed --num_gpus=4 train_ds.py                  # 4 GPUs, same config: 4x the global batch
  deepspeed --hostfile=hostfile train_ds.py           # every GPU of the nodes listed in hostfile
  torchrun --nproc_per_node=2 train_ds.py             # the same script under torchrun
  python train_ds.py --epochs 3                       # one process, no launcher needed
  deepspeed --num_gpus=1 train_ds.py --dataset mnist  # real MNIST, downloaded into ./data
  deepspeed --num_gpus=1 train_ds.py --resume         # continue the run in --output-dir

Outputs in --output-dir (default runs/01_basic_convnet): checkpoints/ (latest and best epoch),
model.pt (plain state dict of the last epoch), metrics.json and curves.png. A directory holding
a run is never replaced silently: --resume continues it, --overwrite replaces it.
"""

import argparse
import contextlib
import fcntl
import functools
import glob
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.config import DeepSpeedConfig
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

EXAMPLE = "01_basic_convnet"
HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = [str(d) for d in range(10)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TEST_BATCH = 1000  # images per evaluation batch and rank
# The final summary's rating of held-out test accuracy: (lowest %, tier), best first
QUALITY = ((90, "Excellent"), (70, "Good"), (50, "Fair"), (0, "Poor"))
PLATEAU = 0.01  # a plateau: the train loss moves by less than 1% (relative) for a few epochs
DATA_FILES = {"mnist": "MNIST/raw"}  # under --data-dir
RUN_FILES = ("checkpoints", "metrics.json", "model.pt", "curves.png")  # what --overwrite replaces
OWNED = {}  # rank 0's hold on --output-dir: the locked file, and whether this run made the dir


class UsageError(Exception):
    """A mistake in flags, config, files or data: one or two lines on stderr."""
    code = 2


class TrainingDiverged(Exception):
    """--max-bad-steps non-finite steps in a row: a diagnosis."""
    code = 3


def main(args):
    start = time.time()
    cfg, dtype, ckpt = check_inputs(args)  # before anything slow starts
    device = setup_distributed()
    checked = check_with_deepspeed(cfg, args.deepspeed_config)  # for this world size
    torch.manual_seed(args.seed)  # the model's initial weights
    data = load_data(args, checked, device, DTYPES[dtype])
    fill_schedule(cfg, args, data.micro_batches // checked.gradient_accumulation_steps)
    model = CNNModelEnhanced(len(data.classes))
    model.classes = data.classes  # model.pt carries them
    # The engine owns the optimizer, LR schedule, precision, ZeRO partitions, the
    # gradient all-reduce and checkpoints, as the config says. With training_data it also
    # builds the loader: a DistributedSampler gives each rank its own shuffled shard.
    with config_errors_in_one_line(args.deepspeed_config):
        engine, _, data.loader, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=cfg,
            training_data=data.trainset)
    data.loader.data_sampler.seed = args.seed  # DeepSpeed seeds its sampler with 0
    run = RunState()
    if ckpt:
        run = restore(engine, ckpt)  # load_checkpoint: weights, optimizer, LR schedule
    run.identity = identity(args, CNNModelEnhanced)  # saved with every checkpoint
    print_banner(args, cfg, dtype, engine, data, model)
    wandb_run = init_wandb(args, cfg)

    for epoch in range(run.epoch, args.epochs):
        train = train_one_epoch(engine, data, run, args, wandb_run)
        test = evaluate(engine, data)  # over all ranks
        row = {"epoch": epoch + 1, **train, **test, "lr": engine.get_lr()[0]}
        best = run.record(row, test["test_accuracy"], args)  # best epoch, patience used
        row["plateau"] = on_plateau(run.history, args.plateau_epochs)
        run.wall_time_s += time.time() - start
        start = time.time()
        print_epoch(row, args, best)
        if wandb_run:
            epoch_row = {f"epoch/{k}": v for k, v in row.items()}
            wandb_run.log(epoch_row, step=engine.global_samples)
        save_epoch(engine, run, args, cfg)  # every rank: ZeRO saves a shard per rank
        reason = run.stop_reason(args, engine.global_steps)  # the same on every rank
        if reason:
            say(reason)
            break
    report(run, args, cfg, data.classes, wandb_run)
    return 0


def check_inputs(args):
    """What the user gave, checked before anything slow starts: (config, precision, checkpoint).
    The checkpoint comes first: flags not given again come from it."""
    ckpt = None
    if args.resume is not None:
        ckpt = read_checkpoint(args, CNNModelEnhanced)
    cfg, dtype = load_config(args, get_accelerator().device_name() == "cpu")
    check_output_dir(args)
    return cfg, dtype, ckpt


def setup_distributed():
    """The process group; returns this rank's device. Without a launcher (plain `python`) it
    first sets the environment a launcher would set for one process."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))  # a free port
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    accelerator = get_accelerator()
    local_rank = int(os.environ["LOCAL_RANK"])
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    accelerator.set_device(local_rank)
    return torch.device(accelerator.device_name(local_rank))


def check_with_deepspeed(cfg, path):
    """DeepSpeed's own check of the config (batch sizes for this world size, ZeRO, precision),
    its message in one line naming the file. Returns the checked config."""
    try:
        return DeepSpeedConfig(cfg)
    except Exception as e:  # noqa: BLE001 - an AssertionError, pydantic's ValidationError, ...
        message = " ".join(str(e).split())[:300]  # pydantic's spans several lines
        raise UsageError(f"{path}: {type(e).__name__}: {message}") from None


def load_data(args, checked, device, dtype):
    """Training and test digits, normalized [N, 1, 28, 28]. The training set goes to
    deepspeed.initialize, which builds its loader; every rank reads its share of the test set."""
    if args.dataset == "synthetic":
        sets = [synthetic_digits(10_000, args.seed, 1), synthetic_digits(2_000, args.seed, 2)]
    else:
        sets = rank0_first(lambda: load_mnist(args.data_dir), device)
    return shard_for_the_ranks(sets, CLASSES, checked, device, dtype)


def shard_for_the_ranks(sets, classes, checked, device, dtype):
    """The training set for DeepSpeed's loader, whose DistributedSampler pads each rank's shard to
    ceil(n / world) images and keeps a last, smaller micro-batch: an epoch takes whole
    gradient-accumulation windows. Each rank reads its share of the test set, padded to one length
    so that every rank runs as many forward passes (ZeRO-3 gathers weights in each); evaluate()
    leaves the pads out."""
    world = dist.get_world_size()
    micro = checked.train_micro_batch_size_per_gpu
    accumulation = checked.gradient_accumulation_steps
    batches = math.ceil(math.ceil(len(sets[0]) / world) / micro)
    if batches < accumulation:
        raise UsageError(f"{len(sets[0])} images cannot fill one step of {micro} images x "
                         f"{accumulation} accumulation steps x {world} ranks")
    test = DataLoader(sets[1], TEST_BATCH, sampler=DistributedSampler(sets[1], shuffle=False))
    return SimpleNamespace(trainset=sets[0], test=test, classes=classes, device=device,
                           dtype=dtype, micro_batches=batches // accumulation * accumulation)


def synthetic_digits(n, seed, split):
    """n images [n, 1, 28, 28] in 10 classes: a smooth pattern per class (from seed), shifted by up
    to 3 px, scaled in contrast and buried in noise of 3x its std, so that the model needs several
    epochs: a plain Adam loop reaches ~87% test accuracy after 3."""
    protos = torch.randn(10, 1, 7, 7, generator=torch.Generator().manual_seed(seed))
    protos = F.interpolate(protos, 28, mode="bilinear")
    protos = (protos - protos.mean((1, 2, 3), keepdim=True)) / protos.std((1, 2, 3), keepdim=True)
    g = torch.Generator().manual_seed(seed * 1000 + split)
    labels = torch.randint(0, 10, (n,), generator=g)
    shift = torch.randint(-3, 4, (n, 2), generator=g)  # pixels down and right
    x = protos[labels]
    for a in range(-3, 4):  # roll each image by its own shift: one roll per distinct shift
        for b in range(-3, 4):
            sel = (shift[:, 0] == a) & (shift[:, 1] == b)
            x[sel] = x[sel].roll((a, b), (2, 3))
    x = x * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g))  # contrast
    x = x + 3 * torch.randn(x.shape, generator=g)  # noise of 3x the patterns' std
    return TensorDataset(x / 10**0.5, labels)  # std sqrt(1 + 9) scaled to ~1, as MNIST's pixels


def rank0_first(load, device):
    """load() on rank 0 first (it may download), then on the others; an error stops every rank."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = load()
        except UsageError as e:
            error = e
    failed = torch.tensor([float(error is not None)], device=device)
    dist.all_reduce(failed)
    if failed.item():
        raise error or UsageError("rank 0 could not load the dataset (it says why)")
    return result if dist.get_rank() == 0 else load()


def load_mnist(data_dir):
    """torchvision's MNIST as normalized [N, 1, 28, 28] images. torchvision downloads what is
    missing and checks each file's header and size; labels 0-9, one per image, are checked here."""
    from torchvision.datasets import MNIST

    try:
        sets = [MNIST(data_dir, train=train, download=True) for train in (True, False)]
    except Exception as e:  # noqa: BLE001 - offline, corrupt or missing files: all user-facing
        raise UsageError(f"MNIST in {data_dir} is missing or corrupted and could not be "
                         f"downloaded ({first_line(e)[:80]}).\nFetch the four *-ubyte.gz files "
                         "from https://ossci-datasets.s3.amazonaws.com/mnist/ into "
                         f"{data_dir}/MNIST/raw, or use --dataset synthetic") from None
    for s in sets:
        if len(s.data) != len(s.targets) or s.targets.max() > 9:
            raise UsageError(f"MNIST in {s.raw_folder} is corrupted: {len(s.data)} images, "
                             f"{len(s.targets)} labels up to {s.targets.max()}; delete it and "
                             "fetch it again, or use --dataset synthetic")
    # MNIST's pixel mean and std: inputs of mean 0 and std 1, like the generated digits
    return [TensorDataset((s.data.unsqueeze(1).float() / 255 - 0.1307) / 0.3081, s.targets)
            for s in sets]


def fill_schedule(cfg, args, steps_per_epoch):
    """WarmupCosineLR and WarmupDecayLR need the run's length in optimizer steps, which depends on
    the dataset, the epochs and this run's world size: the script fills it in."""
    if cfg.get("scheduler", {}).get("type") in ("WarmupCosineLR", "WarmupDecayLR"):
        params = cfg["scheduler"].setdefault("params", {})
        params["total_num_steps"] = total = max(1, args.epochs * steps_per_epoch)
        params["warmup_num_steps"] = max(1, min(total, round(args.warmup_epochs * steps_per_epoch)))


class CNNModelEnhanced(nn.Module):
    """conv(1->16, 5x5), pool, conv(16->32, 5x5), pool, fc(1568->128), fc(128->10)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)
        # Kaiming/He init (fan_out) for the layers a ReLU follows: it keeps the activations'
        # scale from layer to layer, where PyTorch's default init shrinks it.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # The output layer feeds softmax, not a ReLU: near-zero logits start every class at 1/10
        # (loss ln 10 = 2.3) instead of confident and wrong.
        nn.init.normal_(self.fc2.weight, std=0.01)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))  # [B, 16, 14, 14]
        x = self.pool(F.relu(self.conv2(x)))  # [B, 32, 7, 7]
        return self.fc2(F.relu(self.fc1(x.flatten(1))))  # [B, 10] logits

    classes = CLASSES  # its outputs' names, carried in model.pt; main() sets the dataset's

    def get_extra_state(self):  # a tensor, so that model.pt loads with weights_only=True
        return torch.tensor(list(json.dumps(list(self.classes)).encode()), dtype=torch.uint8)

    def set_extra_state(self, state):
        self.classes = json.loads(bytes(state.byte().tolist()))


@dataclass
class RunState:
    """What a checkpoint carries besides weights, optimizer and LR schedule, so that --resume goes
    on as if the run had never stopped (the data order follows --seed and the epoch)."""
    epoch: int = 0  # epochs completed
    best_accuracy: float = -1.0  # the best epoch's test accuracy, % (model.pt is the last epoch)
    best_epoch: int = 0
    best_loss: float = math.inf  # the lowest epoch train loss, for early stopping
    patience_used: int = 0  # epochs since the train loss last gained --min-improvement
    skipped_steps: int = 0  # non-finite steps skipped so far
    history: list = field(default_factory=list)  # metrics.json's rows, one per epoch
    wall_time_s: float = 0.0
    rng: dict = field(default_factory=dict)  # torch's random states, for models that draw
    identity: dict = field(default_factory=dict)  # dataset, data, seed, model, flags given

    def record(self, row, accuracy, args):
        """Add an epoch's row; True if `accuracy` is the best so far."""
        self.history.append(row)
        self.epoch = row["epoch"]
        self.skipped_steps += row["skipped_steps"]
        # Early stopping counts epochs whose train loss is not --min-improvement below the best.
        if row["train_loss"] < self.best_loss - args.min_improvement:
            self.patience_used = 0
        else:
            self.patience_used += 1
        self.best_loss = min(self.best_loss, row["train_loss"])
        if accuracy > self.best_accuracy:
            self.best_accuracy = accuracy
            self.best_epoch = self.epoch
        return self.best_epoch == self.epoch

    def stop_reason(self, args, steps):
        """Why training ends before its last epoch, or None; from global numbers: on every rank."""
        if 0 < args.max_steps <= steps:
            return f"Stopping at --max-steps {args.max_steps}"
        if self.patience_used >= args.patience and self.epoch < args.epochs:
            return f"Early stopping: no train-loss gain for {args.patience} epochs"
        return None


def restore(engine, ckpt):
    """Weights, optimizer and LR schedule through DeepSpeed; then the loop's RunState."""
    try:
        engine.load_checkpoint(ckpt.folder, tag=ckpt.tag, load_lr_scheduler_states=True)
    except Exception as e:  # noqa: BLE001 - a truncated shard, another model: user-facing
        raise UsageError(f"--resume: cannot load {ckpt.folder}/{ckpt.tag}: {first_line(e)}"
                         ) from None
    run = RunState(**ckpt.state["run"])
    torch.set_rng_state(run.rng["cpu"])
    get_accelerator().set_rng_state(run.rng["device"])
    say(f"Resumed {ckpt.folder}/{ckpt.tag}, continuing at epoch {run.epoch + 1}")
    return run


def print_banner(args, cfg, dtype, engine, data, model):
    """What this run is, with the sizes derived for this world size."""
    world = dist.get_world_size()
    steps = data.micro_batches // engine.gradient_accumulation_steps()
    sched = cfg.get("scheduler", {})
    say("=" * 80, f"DeepSpeed CNN training: {EXAMPLE}",
        f"Data     : {args.dataset}, {len(data.trainset):,} train / {len(data.test.dataset):,} "
        "test images, 1x28x28",
        f"Model    : CNNModelEnhanced, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{dtype}, ZeRO stage {engine.zero_optimization_stage()}, {engine.device.type} x {world}",
        f"Batch    : {engine.train_micro_batch_size_per_gpu()} per rank x "
        f"{engine.gradient_accumulation_steps()} accumulation x {world} ranks = "
        f"{engine.train_batch_size()}; {steps} steps/epoch, {steps * args.epochs} in all",
        f"Schedule : {cfg['optimizer']['type']} lr {cfg['optimizer']['params']['lr']}, "
        f"{sched.get('type', 'constant')} {json.dumps(sched.get('params', {}))}",
        f"Stopping : after {args.patience} epochs without a train-loss gain of "
        f"{args.min_improvement:g}, or {args.max_bad_steps} non-finite steps in a row",
        f"Output   : {os.path.abspath(args.output_dir)}", "=" * 80)


def init_wandb(args, cfg):
    """Weights & Biases when asked for (rank 0 only); a failure only costs the logging."""
    if not (args.wandb or os.environ.get("WANDB_API_KEY")) or dist.get_rank() != 0:
        return None
    try:
        import wandb

        timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", 60))  # W&B's own variable
        return wandb.init(project="deepspeed-cnn-examples", name=EXAMPLE,
                          config={"ds_config": cfg, **vars(args)},
                          settings=wandb.Settings(init_timeout=timeout, silent=True))
    except Exception as e:  # noqa: BLE001 - no network, a bad key, not installed
        say(f"warning: Weights & Biases disabled ({first_line(e)[:150]})")
        return None


def train_one_epoch(engine, data, run, args, wandb_run):
    """One pass over this rank's shard. Loss, hits, grad norm, images and steps are summed on the
    device, and read (summed over ranks) only for a log line and at the epoch's end."""
    start = time.time()
    window = torch.zeros(5, device=data.device)  # loss x images, hits, norm, images, steps
    line = torch.zeros(5, device=data.device)  # the same since the last log line
    total = torch.zeros(5, device=data.device)  # and in the whole epoch
    accumulation = engine.gradient_accumulation_steps()
    skipped = 0
    in_a_row = 0  # steps skipped since the last one applied
    line_start = start
    for i, (x, y) in enumerate(train_batches(data, run.epoch)):
        # The window's end is counted here, not by the engine: a step skipped in fp32 never
        # reaches engine.step() (optimizer_step), which would shift every later window.
        boundary = i % accumulation == accumulation - 1
        engine.set_gradient_accumulation_boundary(boundary)
        logits = engine(x).float()  # fp32 logits for the loss, whatever the precision
        loss = F.cross_entropy(logits, y)
        engine.backward(loss)  # gradients averaged over ranks, divided by the accumulation steps
        window[:2] += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum()])
        window[3] += len(y)
        if not boundary:
            engine.step()  # no update yet: DeepSpeed accumulates the gradients
            continue
        norm = optimizer_step(engine)
        if norm is None:  # skipped on every rank alike: its images are not counted
            skipped += 1
            in_a_row += 1
        else:
            window[2] += norm
            window[4] += 1
            line += window
            total += window
            in_a_row = 0
        window.zero_()
        if in_a_row >= args.max_bad_steps:
            raise TrainingDiverged(
                f"training diverged: {in_a_row} non-finite steps in a row in epoch "
                f"{run.epoch + 1}.\n  check: the data for NaN/Inf, a lower learning rate, "
                "gradient_clipping > 0, --dtype fp32 or bf16")
        if norm is not None and engine.global_steps % args.log_interval == 0:
            log_step(engine, run, line, time.time() - line_start, wandb_run)
            line.zero_()
            line_start = time.time()
        if 0 < args.max_steps <= engine.global_steps:
            break
    loss, acc, norm, images = global_means(total)
    seconds = time.time() - start
    return {"train_loss": loss, "train_accuracy": acc, "grad_norm": norm, "skipped_steps": skipped,
            "train_images": images, "epoch_time_s": seconds, "images_per_s": images / seconds}


def train_batches(data, epoch):
    """This rank's training micro-batches of one epoch, from DeepSpeed's loader to the device."""
    data.loader.data_sampler.set_epoch(epoch)  # DeepSpeed never calls it: every epoch, one order
    try:
        for x, y in itertools.islice(data.loader, data.micro_batches):  # whole accumulation windows
            yield x.to(data.device, data.dtype), y.to(data.device)
    finally:
        stop_loader_workers(data.loader)


def optimizer_step(engine):
    """The update that ends an accumulation window: the global gradient norm, or None where the
    step was skipped for non-finite gradients, alike on every rank (they are all-reduced).
    DeepSpeed skips such a step itself under fp16, bf16 and ZeRO; fp32 without ZeRO would apply
    it, so there the script takes the norm and skips the step itself."""
    norm = None
    if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)  # DeepSpeed reports none in fp32 without ZeRO
        if not torch.isfinite(norm):  # one host read a step, on this path only
            engine.zero_grad()
            return None
    skipped = engine.skipped_steps
    engine.step()  # also steps the LR schedule and zeroes the gradients
    if engine.skipped_steps != skipped:
        return None
    if norm is None:
        return engine.get_global_grad_norm()
    return norm


def log_step(engine, run, sums, seconds, wandb_run):
    """The step line: means over all ranks since the last one; to W&B as well when it is on."""
    loss, acc, norm, images = global_means(sums)
    lr = engine.get_lr()[0]
    say(f"  step {engine.global_steps:6d} | epoch {run.epoch + 1:3d} | loss {loss:.4f} | acc "
        f"{acc:6.2f}% | grad norm {norm:.4f} | lr {lr:.3e} | {images / seconds:,.0f} img/s")
    if wandb_run:
        wandb_run.log({"train/loss": loss, "train/accuracy": acc, "train/grad_norm": norm,
                       "train/lr": lr}, step=engine.global_samples)


def global_means(sums):
    """(loss, accuracy %, grad norm, images) over all ranks, from this rank's sums over the steps
    applied; NaN where every step was skipped."""
    total = sums.double()
    dist.all_reduce(total)
    loss, hits, norm, images, steps = total.tolist()
    if steps == 0:
        return math.nan, math.nan, math.nan, 0
    return loss / images, 100 * hits / images, norm / steps, int(images)


@torch.no_grad()
def evaluate(engine, data):
    """Loss and accuracy (%) over the whole test set, each rank taking its share."""
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=data.device)  # loss, hits, images
    sampler = data.test.sampler  # it pads every rank's share to one length with the first images
    places = torch.arange(sampler.rank, sampler.total_size, sampler.num_replicas)
    real = (places < len(data.test.dataset)).to(data.device)
    for i, (x, y) in enumerate(data.test):
        keep = real[i * TEST_BATCH:][:len(y)]
        y = y.to(data.device)
        logits = engine(x.to(data.device, data.dtype)).float()
        sums[0] += (F.cross_entropy(logits, y, reduction="none") * keep).sum()
        sums[1] += ((logits.argmax(1) == y) & keep).sum()
        sums[2] += keep.sum()
    dist.all_reduce(sums)
    engine.train()
    loss, hits, images = sums.tolist()
    return {"test_loss": loss / images, "test_accuracy": 100 * hits / images,
            "test_images": int(images)}


def on_plateau(history, epochs):
    """A loss plateau: in each of the last `epochs` epochs the train loss stayed within PLATEAU
    (relative) of the loss of the epoch before them. A notice, not a stop: the learning rate or
    the model has stopped paying, and early stopping (--patience) may follow. 0 epochs: off."""
    if epochs == 0 or len(history) <= epochs:
        return False
    before = history[-1 - epochs]["train_loss"]
    return all(abs(h["train_loss"] - before) < PLATEAU * before for h in history[-epochs:])


def print_epoch(row, args, best):
    """The epoch's line; `best` marks the best test accuracy so far, `plateau` a loss plateau."""
    marks = ""
    if best:
        marks += " | best"
    if row["plateau"]:
        marks += f" | plateau: train loss within {PLATEAU:.0%} for {args.plateau_epochs} epochs"
    say(f"epoch {row['epoch']:3d}/{args.epochs} | train loss {row['train_loss']:.4f} acc "
        f"{row['train_accuracy']:6.2f}% | test loss {row['test_loss']:.4f} acc "
        f"{row['test_accuracy']:6.2f}% | grad norm {row['grad_norm']:.4f} | lr {row['lr']:.3e} "
        f"| skipped {row['skipped_steps']} | {row['images_per_s']:,.0f} img/s{marks}")


def save_epoch(engine, run, args, cfg):
    """Every rank: the DeepSpeed checkpoint (ZeRO writes a shard per rank) and the plain weights.
    Rank 0: model.pt, then the `latest` pointer by rename (a crash mid-save leaves the previous
    checkpoint in force) and metrics.json; only the latest and best epochs are kept."""
    ckpt = f"{args.output_dir}/checkpoints"
    tag = f"epoch{run.epoch:04d}"
    run.rng = {"cpu": torch.get_rng_state(), "device": get_accelerator().get_rng_state()}
    weights = plain_weights(engine)  # a collective under ZeRO-3
    if dist.get_rank() == 0:
        atomic_write(f"{args.output_dir}/model.pt", lambda tmp: torch.save(weights, tmp))
    try:
        engine.save_checkpoint(ckpt, tag=tag, client_state={"example": EXAMPLE, "run": asdict(run)},
                               save_latest=False)
    except (OSError, RuntimeError) as e:  # a full disk: `latest` still names the previous epoch
        raise save_failed(e, f"{ckpt}/{tag}") from None
    if dist.get_rank() == 0:
        atomic_write(f"{ckpt}/latest", lambda tmp: open(tmp, "w").write(tag))
        for old in os.listdir(ckpt):
            if old.startswith("epoch") and old not in (tag, f"epoch{run.best_epoch:04d}"):
                shutil.rmtree(f"{ckpt}/{old}", ignore_errors=True)
        write_metrics(args, cfg, run)
        settle_set_aside(args.output_dir)  # the run --overwrite replaces goes now


def plain_weights(engine):
    """The model as a plain fp32 state dict. Under fp16/bf16 the optimizer holds the fp32 master
    weights, under ZeRO-3 each rank a part of them: a collective, so every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = dict(engine.module.state_dict())  # with the class names (get_extra_state)
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None in fp32 without ZeRO: p is the fp32 weight
        state[name] = p if full is None else full
    tensors = {k: v.detach().cpu() for k, v in state.items() if torch.is_tensor(v)}
    return {**state, **{k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}}


def write_metrics(args, cfg, run, final=None):
    doc = {"example": EXAMPLE, "world_size": dist.get_world_size(), "config": cfg,
           "epochs": run.history, "final": final,
           "args": {k: v for k, v in vars(args).items() if k != "local_rank"}}
    atomic_write(f"{args.output_dir}/metrics.json", lambda t: open(t, "w").write(json.dumps(doc)))


def report(run, args, cfg, classes, wandb_run):
    """The final summary, rated on held-out test accuracy, with train accuracy beside it."""
    last = run.history[-1]
    tier, meaning = quality(last["test_accuracy"])
    final = {"test_accuracy": last["test_accuracy"], "train_accuracy": last["train_accuracy"],
             "best_test_accuracy": run.best_accuracy, "best_epoch": run.best_epoch,
             "quality": tier, "epochs_completed": run.epoch,
             "stopped_early": run.epoch < args.epochs and run.patience_used >= args.patience,
             "plateau_epochs": [row["epoch"] for row in run.history if row["plateau"]],
             "skipped_steps": run.skipped_steps, "wall_time_s": run.wall_time_s,
             "classes": classes}
    if dist.get_rank() != 0:
        return
    write_metrics(args, cfg, run, final)
    saved = "model.pt, metrics.json, curves.png"
    if not plot_curves(run.history, f"{args.output_dir}/curves.png"):
        saved = "model.pt, metrics.json (pip install matplotlib for curves.png)"
    say("=" * 80, f"Training finished: {run.epoch} epochs, {run.wall_time_s:.1f}s wall",
        f"  train loss     {run.history[0]['train_loss']:.4f} -> {last['train_loss']:.4f}",
        f"  train accuracy {last['train_accuracy']:.2f}%",
        f"  test accuracy  {last['test_accuracy']:.2f}% (best {run.best_accuracy:.2f}% in epoch "
        f"{run.best_epoch})",
        f"Quality (held-out test accuracy): {tier}: {meaning}",
        f"Saved: {args.output_dir}/{saved}")
    if wandb_run:
        wandb_run.summary.update(final)
        wandb_run.finish()


def quality(accuracy):
    """(tier, what it means) for a held-out test accuracy in %, on this example's QUALITY floors."""
    floor, tier = next(level for level in QUALITY if accuracy >= level[0])  # the last floor is 0
    if floor > 0:
        return tier, f"at least {floor}% of held-out test images classified correctly"
    return tier, f"under {QUALITY[-2][0]}% right: train longer or revisit the learning rate"


def plot_curves(history, path):
    """curves.png: loss and accuracy per epoch, train and test; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, what, unit in zip(axes, ("loss", "accuracy"), ("cross-entropy", "accuracy (%)")):
        for split in ("train", "test"):
            ax.plot([h["epoch"] for h in history], [h[f"{split}_{what}"] for h in history],
                    label=f"{split} {what}")
        ax.set(xlabel="epoch", ylabel=unit)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(EXAMPLE)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return True


# ======================================== plumbing: inputs, --resume, --output-dir, stopping
def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--epochs", type=int, default=50, help="epochs; the LR schedule spans them")
    add("--warmup-epochs", type=float, default=5, help="linear LR warmup, in epochs")
    add("--dataset", choices=["synthetic", "mnist"], default="synthetic",
        help="synthetic: generated from --seed, offline; mnist: torchvision's, in --data-dir")
    add("--data-dir", default="./data", help="where the dataset is read or downloaded")
    add("--output-dir", default=f"runs/{EXAMPLE}", help="checkpoints, model.pt, metrics.json")
    again = p.add_mutually_exclusive_group()  # a run in --output-dir: continue it, or replace it
    again.add_argument("--resume", nargs="?", const="", metavar="DIR",
                       help="continue the run in DIR (default: --output-dir)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --output-dir")
    add("--allow-changes", action="store_true",
        help="--resume with another dataset, data, seed or model than the checkpoint's")
    add("--seed", type=int, default=42, help="init, data order and synthetic data")
    add("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: the config's precision")
    add("--patience", type=int, default=15, help="epochs without a train-loss gain, then stop")
    add("--min-improvement", type=float, default=1e-5, help="the train-loss gain that counts")
    add("--plateau-epochs", type=int, default=3,
        help="epochs of < 1%% train-loss change that the epoch line calls a plateau (0: off)")
    add("--max-bad-steps", type=int, default=100, help="non-finite steps in a row that end the run")
    add("--log-interval", type=int, default=50, help="optimizer steps between step lines")
    add("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    add("--wandb", action="store_true", help="log to W&B (also on when WANDB_API_KEY is set)")
    add("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the launcher
    args = deepspeed.add_config_arguments(p).parse_args(argv)  # --deepspeed, --deepspeed_config
    # The flags given on the command line: --resume takes the others from the checkpoint.
    unset = object()  # argparse fills in a default only where the namespace has no value
    given = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    args.given = {k: v for k, v in vars(given).items() if v is not unset and k != "local_rank"}
    args.deepspeed_config = args.deepspeed_config or os.path.join(HERE, "ds_config.json")
    for name, low in (("epochs", 1), ("warmup_epochs", 0), ("patience", 1), ("min_improvement", 0),
                      ("plateau_epochs", 0), ("max_bad_steps", 1), ("log_interval", 1),
                      ("max_steps", 0)):
        if getattr(args, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, "
                             f"not {getattr(args, name)}")
    return args


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage text
        raise UsageError(f"{message} (see --help)")


def read_checkpoint(args, model_class):
    """The checkpoint --resume names, read and checked before DeepSpeed starts. Flags not given
    again come from it; another dataset, data, seed or model needs --allow-changes."""
    folder = f"{args.resume or args.output_dir}/checkpoints"
    if not os.path.isfile(f"{folder}/latest"):
        raise UsageError(f"--resume: no checkpoint in {folder} (no `latest` file)")
    with open(f"{folder}/latest") as f:
        tag = f.read().strip()
    files = glob.glob(f"{folder}/{tag}/*mp_rank_00_model_states.pt")  # ZeRO-3: zero_pp_rank_0_...
    try:  # DeepSpeed's own file: its config and counters, and our client_state
        state = torch.load(files[0], weights_only=False)
    except Exception as e:  # noqa: BLE001 - missing, truncated or foreign files: user-facing
        raise UsageError(f"--resume: cannot load {folder}/{tag}: {first_line(e)}") from None
    if not isinstance(state, dict) or state.get("example") != EXAMPLE:
        raise UsageError(f"--resume: {folder}/{tag} is not a checkpoint of {EXAMPLE}")
    was = state["run"].get("identity")
    if not was and not args.allow_changes:
        raise UsageError(f"--resume: {folder}/{tag} does not record its run's dataset, seed and "
                         "flags (an older script wrote it); --allow-changes resumes it as told")
    if was:
        take_flags(args, was["args"])
        now = identity(args, model_class)
        changed = [f"{k} {was[k]} -> {now[k]}" for k in ("dataset", "data", "seed", "model")
                   if was[k] != now[k]]
        if changed and not args.allow_changes:
            raise UsageError(f"--resume: {folder}/{tag} holds another run: {'; '.join(changed)} "
                             "(checkpoint -> this command); leave such flags out to continue "
                             "it, or add --allow-changes if the change is meant")
    if state["run"]["epoch"] >= args.epochs:
        raise UsageError(f"--resume: {folder}/{tag} has trained all {args.epochs} epochs; raise "
                         "--epochs to train on")
    # Under ZeRO each rank holds its part of the optimizer state: it resumes on as many ranks.
    stage = state["ds_config"].get("zero_optimization", {}).get("stage", 0)
    ranks = state["dp_world_size"]
    if stage > 0 and ranks != int(os.environ.get("WORLD_SIZE", 1)):
        kind = state["ds_config"]["optimizer"]["type"]
        raise UsageError(f"--resume: {folder}/{tag} is {kind} under ZeRO stage {stage} on {ranks} "
                         f"ranks: resume on {ranks} ranks (02_cifar10 converts an Adam/AdamW one "
                         "for another count with ds_to_universal)")
    return SimpleNamespace(folder=folder, tag=tag, state=state)


def take_flags(args, given):
    """The flags the checkpoint's run was given, where this command does not give them again;
    where to write, when to stop and what to resume are this command's own."""
    own = ("resume", "output_dir", "overwrite", "max_steps", "allow_changes")
    taken = {k: v for k, v in given.items() if k not in args.given and k not in own}
    vars(args).update(taken)
    args.given.update(taken)
    if taken:
        say("Flags from the checkpoint: " + " ".join(f"{k}={v}" for k, v in taken.items()))


def identity(args, model_class):
    """What makes a run this run, saved in its checkpoints: the dataset and a fingerprint of its
    files, the seed, the model, and the flags the user gave ("args")."""
    return {"dataset": args.dataset, "data": data_fingerprint(args), "seed": args.seed,
            "model": model_class.__name__, "args": args.given}


def data_fingerprint(args):
    """The dataset's files, cheaply: their paths under --data-dir (which may move), sizes, and 4 KB
    from the start, middle and end of 256 of them at most. Generated data: its size."""
    if args.dataset == "synthetic":
        return f"generated, size {vars(args).get('synthetic_size', 'fixed')}"
    root = os.path.join(args.data_dir, DATA_FILES[args.dataset])
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names)
    listing = [(os.path.relpath(path, root), os.path.getsize(path)) for path in files]
    digest = hashlib.sha256(repr(listing).encode())
    for path, (_, size) in list(zip(files, listing))[::max(1, len(files) // 256)]:
        with contextlib.suppress(OSError), open(path, "rb") as f:  # unreadable: the loader says so
            for at in (0, size // 2, max(0, size - 4096)):
                f.seek(at)
                digest.update(f.read(4096))
    return f"{len(files)} files, {digest.hexdigest()[:12]}"


def load_config(args, on_cpu):
    """The DeepSpeed JSON, which owns batch size, precision, optimizer, scheduler and ZeRO, set to
    the precision this run trains in: (config, "fp32" | "fp16" | "bf16")."""
    cfg = read_config(args.deepspeed_config)
    dtype = choose_precision(cfg, args.dtype, on_cpu, args.deepspeed_config)
    refuse_fp16_without_zero(cfg, args.deepspeed_config)
    cfg.setdefault("steps_per_print", None)  # the script prints its own step lines
    return cfg, dtype


def read_config(path):
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        what = "not found" if isinstance(e, FileNotFoundError) else "not valid JSON"
        raise UsageError(f"DeepSpeed config {what}: {path} ({first_line(e)})") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"DeepSpeed config {path}: not a JSON object {{...}}")
    if not isinstance(cfg.get("optimizer"), dict):  # else DeepSpeed fails at the first backward
        raise UsageError(f"{path}: optimizer = {json.dumps(cfg.get('optimizer'))}: the engine "
                         "builds its optimizer from this JSON object {\"type\", \"params\"}")
    return cfg


def choose_precision(cfg, dtype, on_cpu, path):
    """--dtype, else the config's fp16 or bf16 section, else fp32; the config is made to say so."""
    enabled = [k for k in ("fp16", "bf16") if cfg.get(k, {}).get("enabled")]
    if len(enabled) > 1:
        raise UsageError(f"{path}: fp16.enabled and bf16.enabled: enable one of them at most")
    if dtype == "auto":
        dtype = enabled[0] if enabled else "fp32"
    if dtype == "fp16" and on_cpu:
        say("notice: fp16 is not supported on the CPU; training in fp32 instead")
        dtype = "fp32"
    sections = {"fp16": cfg.pop("fp16", {}), "bf16": cfg.pop("bf16", {})}
    if dtype != "fp32":
        cfg[dtype] = {**sections[dtype], "enabled": True}
    if dtype == "bf16":  # without it DeepSpeed's bf16 applies a step with non-finite gradients
        cfg["bf16"]["check_grad_overflow"] = True
    return dtype


def check_output_dir(args):
    """Never replace a run silently. Rank 0 holds --output-dir first, so that two runs cannot both
    pass; --overwrite sets the old run aside in .replaced/ until the new one has a checkpoint."""
    out = args.output_dir
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        claim_output_dir(out)
        settle_set_aside(out)  # a run killed while it replaced this one
    held = [f for f in RUN_FILES if os.path.exists(f"{out}/{f}")]
    here = os.path.realpath(out)
    resuming_it = args.resume is not None and os.path.realpath(args.resume or out) == here
    if held and not (args.overwrite or resuming_it):
        raise UsageError(f"--output-dir {out} already holds a run ({', '.join(held)}).\nAdd "
                         "--resume to continue it, --overwrite to replace it, or choose another")
    if held and args.overwrite and rank0:  # gathered, then renamed: a kill -9 never splits them
        os.mkdir(f"{out}/.moving")
        for f in held:
            os.rename(f"{out}/{f}", f"{out}/.moving/{f}")
        os.rename(f"{out}/.moving", f"{out}/.replaced")


def claim_output_dir(out):
    """Hold --output-dir while this run runs: an flock on a file in it, which the kernel drops
    however the process ends, kill -9 included. A second run is refused, naming the holder."""
    made = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
        fd = os.open(f"{out}/.lock", os.O_RDWR | os.O_CREAT)
    except OSError as e:  # under a file, no permission, a read-only disk
        raise UsageError(f"cannot write to --output-dir {out}: {first_line(e)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        time.sleep(0.1)  # the holder writes its pid just after it locks
        holder = os.pread(fd, 200, 0).decode()
        os.close(fd)
        raise UsageError(f"--output-dir {out} is in use by another run ({holder}); wait for it "
                         "to end, or choose another --output-dir") from None
    if os.fstat(fd).st_nlink == 0:  # its last holder removed it as we opened it: a new one
        os.close(fd)
        return claim_output_dir(out)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    OWNED.update(fd=fd, made=made)


def settle_set_aside(out):
    """Finish what --overwrite began: the old run in .replaced/ goes once the new run has saved a
    checkpoint, else it comes back (the new run failed first); so does one left in .moving/."""
    if os.path.isdir(f"{out}/.replaced") and os.path.isfile(f"{out}/checkpoints/latest"):
        shutil.rmtree(f"{out}/.replaced")
    elif os.path.isdir(f"{out}/.replaced"):
        for new in (f"{out}/{f}" for f in RUN_FILES):  # the failed run's
            if os.path.isdir(new):
                shutil.rmtree(new)
            elif os.path.exists(new):
                os.remove(new)
        os.rename(f"{out}/.replaced", f"{out}/.moving")
    if os.path.isdir(f"{out}/.moving"):
        for f in os.listdir(f"{out}/.moving"):
            os.rename(f"{out}/.moving/{f}", f"{out}/{f}")
        os.rmdir(f"{out}/.moving")
        say(f"notice: {out}: the run that --overwrite was replacing is back (the new run saved no "
            "checkpoint)")


def release_output_dir(args):
    """Rank 0, at the end of every run: settle --overwrite's old run, give the directory up (the
    lock file goes first) and remove it if this run made it and left it empty."""
    if "fd" not in OWNED:
        return
    settle_set_aside(args.output_dir)
    os.remove(f"{args.output_dir}/.lock")
    os.close(OWNED.pop("fd"))
    if OWNED.pop("made"):
        with contextlib.suppress(OSError):  # not empty
            os.rmdir(args.output_dir)


def atomic_write(path, write):
    """write(tmp), then rename tmp to `path`: a crash never leaves a half-written file there."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        raise UsageError(f"cannot write {path}: {first_line(e)} (disk full? free some space or "
                         "choose another --output-dir)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run(argv=None):
    """main() as a command: exit code 2 for a user's mistake (one or two lines), 3 for divergence,
    130 for Ctrl-C, 143 for SIGTERM (also when the launcher or another rank is gone)."""
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    watch_launcher()
    quiet_known_messages()
    quiet_a_stopped_handover()
    code = 1
    args = None
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        args = parse_args(argv)
        code = main(args)
    except (UsageError, TrainingDiverged) as e:
        code = e.code
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        else:
            time.sleep(3)  # let rank 0 say why before the launcher ends every rank
    except (KeyboardInterrupt, SystemExit, RuntimeError) as e:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a launcher's second signal: let us finish
            signal.signal(sig, signal.SIG_IGN)
        if isinstance(e, RuntimeError) and not from_a_collective(e):
            raise
        code = 130 if isinstance(e, KeyboardInterrupt) else getattr(e, "code", 143)
        if rank0:
            print(f"stopped (exit code {code}): --resume goes on from the last saved epoch",
                  file=sys.stderr)
    finally:
        if dist.is_initialized():
            if code == 0:  # every rank waits for rank 0's last files before tearing down
                dist.barrier()
            dist.destroy_process_group()
        release_shm_buffer()
        release_output_dir(args)
    return code


def from_a_collective(e):
    """An error raised inside torch.distributed: a collective whose peer rank went away."""
    return f"torch{os.sep}distributed" in traceback.extract_tb(e.__traceback__)[-1].filename


def save_failed(e, where):
    """What a failed checkpoint save raises: a collective's error as it is (another rank stopped
    while the ranks saved together), else one line that names the likely cause."""
    if from_a_collective(e):
        return e
    return UsageError(f"cannot write checkpoint {where}: {first_line(e)} (disk full? free some "
                      "space or choose another --output-dir)")


def exit_on_sigterm(signum, frame):
    """SIGTERM ends the run as sys.exit(143), but not inside code Python calls for C and whose
    exceptions it prints and drops: a finalizer (a data loader's __del__ joining its workers) or a
    handler run at fork (a loader starting its workers). That signal is dropped instead, and the
    launcher's watcher, or the launcher, sends another."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or code.co_filename.endswith("popen_fork.py"):
            return
        frame = frame.f_back
    sys.exit(143)


@functools.cache  # one watcher per process, however many runs it holds
def watch_launcher():
    """On one node the `deepspeed` command forwards no signal: killed, it leaves launch.py and the
    ranks training. So a rank checks every second that its parent (and launch.py's) still runs."""
    if "LOCAL_RANK" not in os.environ:  # plain `python`: no launcher
        return
    links = [(os.getpid(), parent_pid(os.getpid()))]
    with contextlib.suppress(OSError), open(f"/proc/{links[0][1]}/cmdline", "rb") as f:
        if b"deepspeed.launcher.launch" in f.read():
            links.append((links[0][1], parent_pid(links[0][1])))

    def watch():
        while all(parent_pid(pid) == parent for pid, parent in links):  # else reparented: gone
            time.sleep(1)
        while True:  # each second: a SystemExit raised inside a finalizer (a loader's) is lost
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)

    threading.Thread(target=watch, daemon=True).start()


def parent_pid(pid):
    """Process `pid`'s parent, from Linux's /proc; None where that cannot be read."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])  # after "(command)": state, then ppid


def say(*lines):
    """Print on global rank 0 only (the launcher's RANK; plain `python` is rank 0)."""
    if os.environ.get("RANK", "0") == "0":
        print(*lines, sep="\n", flush=True)


def first_line(e):
    """One line about any exception, also one with an empty message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


# ======================================================= DeepSpeed 0.19.8 workarounds
def refuse_fp16_without_zero(cfg, path):
    """fp16 without ZeRO divides every update by the loss scale without having scaled the loss
    (DeepSpeed 0.18.3-0.19.x, runtime/engine.py; fix pending: deepspeedai/DeepSpeed#8393)."""
    if cfg.get("fp16", {}).get("enabled") and cfg.get("zero_optimization", {}).get("stage", 0) == 0:
        raise UsageError(f"{path}: fp16 needs zero_optimization.stage >= 1 in DeepSpeed 0.19 "
                         "(without ZeRO its updates shrink); add a ZeRO stage or use --dtype bf16")


@contextlib.contextmanager
def config_errors_in_one_line(path):
    """deepspeed.initialize passes on its own check of the optimizer's name, and the optimizer's or
    scheduler's errors (a negative warmup, betas of one number), with a traceback; the engine's
    method in its frames names the section of the config."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - any other error goes on as it is
        frames = {frame.name for frame in traceback.extract_tb(e.__traceback__)}
        sections = {"_do_sanity_check": "DeepSpeed's check", "_configure_optimizer": "optimizer",
                    "_configure_lr_scheduler": "scheduler"}
        for method, section in sections.items():
            if method in frames:
                raise UsageError(f"{path}: {section}: {first_line(e)}") from None
        raise


def quiet_known_messages():
    """Warnings DeepSpeed 0.19.8 gives on a correct run, filtered by their text."""
    quiet = ("Attempting to get learning rate from scheduler before it has started",)
    logging.getLogger("DeepSpeed").addFilter(lambda r: r.getMessage() not in quiet)
    warnings.filterwarnings("ignore", message=r"barrier\(\): using the device under current")
    zero = ".*(all_gather_into|reduce_scatter)_tensor.* is deprecated"  # ZeRO's, torch >= 2.14
    warnings.filterwarnings("ignore", message=zero)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # CPU: "No CUDA runtime"
    # DeepSpeed's loader always asks for pinned memory, which a machine without GPUs warns about
    warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true but no acc")


def stop_loader_workers(loader):
    """DeepSpeed's loader keeps an epoch's iterator and its worker processes until the next epoch
    (also after one that stopped early), whose shutdown can then stall for seconds: close it."""
    if loader.data is not None:
        loader.data.close()


def quiet_a_stopped_handover():
    """A loader worker hands each batch to its rank through a thread of multiprocessing's
    resource_sharer, which reports a rank that stopped mid-handover (EOFError, BrokenPipeError)
    to sys.excepthook, as a traceback. The workers are forked, so this hook, set in the rank, is
    theirs too: it drops that report and passes every other on."""
    default = sys.excepthook

    def hook(kind, error, tb):
        cut = any(f.filename.endswith("resource_sharer.py") for f in traceback.extract_tb(tb))
        if not (cut and issubclass(kind, (EOFError, OSError))):
            default(kind, error, tb)

    sys.excepthook = hook


def release_shm_buffer():
    """Without GPUs, DeepSpeed's shm all-reduce never unlinks the ~66 MB /dev/shm buffer each rank
    creates; every peer has mapped it by now, so removing the name at exit is safe."""
    env = os.environ
    name = f"{os.getuid()}_{env.get('MASTER_ADDR')}_{env.get('MASTER_PORT')}_{env.get('RANK')}"
    with contextlib.suppress(OSError):
        os.remove(f"/dev/shm/deepspeed_allreduce_buffer_{name}")


if __name__ == "__main__":
    sys.exit(run())
