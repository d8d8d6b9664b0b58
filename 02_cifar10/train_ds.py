"""Example 02: a CNN with BatchNorm on CIFAR-10, trained with DeepSpeed on 1..N GPUs or the CPU.

  deepspeed --num_gpus=1 train_ds.py                  # one GPU; downloads CIFAR-10 into ./data
  deepspeed --num_gpus=4 train_ds.py                  # 4 GPUs, same config: 4x the global batch
  deepspeed --hostfile=hostfile train_ds.py           # every GPU of the nodes listed in hostfile
  python train_ds.py --dataset synthetic --epochs 2   # one process, no launcher, no download
  deepspeed --num_gpus=1 train_ds.py --dataset imagefolder --data-dir DIR  # DIR/{train,test}/CLASS/
  deepspeed --num_gpus=1 train_ds.py --deepspeed_config ds_config_fast.json --epochs 50 \
      --label-smoothing 0.1 --tta-flip                # the fast large-batch recipe
  deepspeed --num_gpus=1 train_ds.py --resume         # continue the run in --output-dir

Outputs in --output-dir (default runs/02_cifar10): checkpoints/ (latest and best epoch), model.pt
(plain state dict of the last epoch, or of the best on --val-split), metrics.json and curves.png.
A directory holding a run is never replaced silently: --resume continues it, --overwrite replaces
it.
"""

import argparse
import contextlib
import fcntl
import functools
import glob
import hashlib
import importlib.util
import json
import logging
import math
import os
import shlex
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

EXAMPLE = "02_cifar10"
HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10's per-channel mean and std, of pixels in [0, 1]
STD = (0.2023, 0.1994, 0.2010)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TEST_BATCH = 1000  # images per evaluation batch and rank
# The final summary's rating of held-out test accuracy: (lowest %, tier), best first
QUALITY = ((80, "Excellent"), (70, "Good"), (60, "Fair"), (0, "Poor"))
DATA_FILES = {"cifar10": "cifar-10-batches-py", "imagefolder": ""}  # --resume checks them
RUN_FILES = ("checkpoints", "metrics.json", "model.pt", "monitor", "curves.png")  # a run's own
OWNED = {}  # rank 0's hold on --output-dir: the locked file, and whether this run made the dir


class UsageError(Exception):
    """A mistake in flags, config, files or data: one or two lines on stderr."""
    code = 2


class TrainingDiverged(Exception):
    """Non-finite loss or gradients that DeepSpeed did not skip: a diagnosis."""
    code = 3


def main(args):
    start = time.time()
    clock = Stopwatch()  # where this process's time goes: one `phases:` line at the end
    resume = None
    if args.resume is not None:  # read first: flags not given again come from it
        resume = read_checkpoint(args, CIFAR10CNNEnhanced)
    world = int(os.environ.get("WORLD_SIZE", 1))  # the launcher's; 1 under plain python
    on_cpu = get_accelerator().device_name() == "cpu"
    cfg, dtype, own_clip = load_config(args, on_cpu)  # read before anything slow starts
    check_output_dir(args)
    if resume:
        fit_to_checkpoint(cfg, resume, world)
    device = setup_distributed()
    check_with_deepspeed(cfg, args.deepspeed_config)  # for this world size
    torch.manual_seed(args.seed)
    clock.lap("setup")

    data = load_data(args, cfg, dtype, dist.get_rank(), dist.get_world_size(), device)
    clock.lap("data")  # decoded and on the device
    fill_schedule(cfg, args, len(data.train) // cfg["gradient_accumulation_steps"])
    model = CIFAR10CNNEnhanced(len(data.classes))
    model.classes = data.classes  # model.pt carries them
    # The engine owns the optimizer, LR schedule, precision, ZeRO partitioning, the
    # gradient all-reduce and checkpoints, all as the config says.
    with config_errors_in_one_line(args.deepspeed_config):
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=cfg)
    skip_on_the_device(engine.optimizer, own_clip)
    run = RunState()
    if resume:
        run = resume_run(engine, resume)  # load_checkpoint; then epoch, best, history, RNG
    run.identity = identity(args, CIFAR10CNNEnhanced)  # saved with every checkpoint
    resumed_at = run.epoch  # with --val-split, this run writes model.pt if an epoch beats it
    print_banner(args, cfg, dtype, own_clip, engine, data)
    wandb_run = init_wandb(args, cfg)
    clock.lap("engine")

    for epoch in range(run.epoch, args.epochs):
        train = train_one_epoch(engine, data, run, args, own_clip)
        test = evaluate(engine, data.test, data.classes, args)
        row = {"epoch": epoch + 1, **train, "test_loss": test["loss"],
               "test_accuracy": test["accuracy"], "test_images": test["images"],
               "lr": engine.get_lr()[0]}
        chosen_on = test  # picks the best epoch; model.pt is never chosen on the test set
        if data.val:
            chosen_on = evaluate(engine, data.val, data.classes, args)
            row["val_accuracy"] = chosen_on["accuracy"]
        best = run.record(row, chosen_on["accuracy"], args)
        run.wall_time_s += time.time() - start
        start = time.time()
        say(epoch_line(row, args, best))
        losses = {k: v for k, v in row.items() if k.endswith(("loss", "accuracy"))}
        record(engine, "Epoch", losses, wandb_run)
        keep = best or not data.val  # model.pt: the best on --val-split, else the last
        save_epoch(engine, run, args, cfg, own_clip, write_model=keep)
        if epoch == resumed_at:
            clock.lap("first_epoch")  # with CUDA's lazy start: kernels load on first use
        reason = run.stop_reason(args, engine.global_steps)
        if reason:
            say(reason)
            break
    clock.lap("epochs")
    saved = run.best_epoch > resumed_at or not data.val
    report(run, test, data, args, cfg, own_clip, wandb_run, model_saved=saved)
    clock.lap("report")
    say(clock.line())
    return 0


def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--epochs", type=int, default=50, help="epochs; the LR schedule spans them")
    add("--warmup-epochs", type=float, default=5, help="linear LR warmup, in epochs")
    add("--dataset", choices=["cifar10", "imagefolder", "synthetic"], default="cifar10",
        help="cifar10: torchvision's, in --data-dir (downloaded); imagefolder: "
             "--data-dir/{train,test}/<class>/<image>; synthetic: generated, offline")
    add("--data-dir", default="./data", help="where the dataset is read or downloaded")
    add("--output-dir", default=f"runs/{EXAMPLE}", help="checkpoints, model.pt, metrics.json")
    again = p.add_mutually_exclusive_group()  # a run in --output-dir: continue it, or replace it
    again.add_argument("--resume", nargs="?", const="", metavar="DIR",
                       help="continue the run in DIR (default: --output-dir)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --output-dir")
    add("--allow-changes", action="store_true", help="--resume with another dataset, data, "
        "seed or model than the checkpoint's")
    add("--seed", type=int, default=42, help="init, data order and augmentation")
    add("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: the config's precision")
    add("--val-split", type=int, default=0, help="training images held out to choose model.pt on")
    add("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing, [0, 1)")
    add("--tta-flip", action="store_true", help="evaluate on each image and its mirror image")
    add("--patience", type=int, default=15, help="epochs without a train-loss gain, then stop")
    add("--min-improvement", type=float, default=1e-5, help="the train-loss gain that counts")
    add("--max-bad-steps", type=int, default=100, help="skipped non-finite steps in an epoch that "
        "end the run")
    add("--log-interval", type=int, default=50, help="optimizer steps between step lines")
    add("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    add("--wandb", action="store_true", help="log to W&B (also on when WANDB_API_KEY is set)")
    add("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the launcher
    args = deepspeed.add_config_arguments(p).parse_args(argv)  # adds --deepspeed_config PATH
    unset = object()  # argparse fills in a default only where the namespace has no value
    given = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    args.given = {k: v for k, v in vars(given).items() if v is not unset and k != "local_rank"}
    args.deepspeed_config = args.deepspeed_config or os.path.join(HERE, "ds_config.json")
    check_args(args)
    return args


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage text
        raise UsageError(f"{message} (see --help)")


def load_config(args, on_cpu):
    """The DeepSpeed JSON, which owns batch size, precision, optimizer, scheduler and ZeRO, checked
    before anything slow starts and set to the precision this run trains in; the script settles
    who clips gradients. Returns (config, "fp32" | "fp16" | "bf16", clip by the script or None)."""
    cfg = read_config(args.deepspeed_config)
    check_config(cfg, args.deepspeed_config)
    dtype = choose_precision(cfg, args.dtype, on_cpu, args.deepspeed_config)
    refuse_fp16_without_zero(cfg, args.deepspeed_config)
    batchnorm_buffers_follow_precision(cfg, dtype)
    # Who clips. In fp32 without ZeRO, DeepSpeed neither skips non-finite steps nor reports the
    # gradient norm, so the script takes the global norm itself (optimizer_step) and clips with
    # it; DeepSpeed's own fp32 clipping would take a second norm, one parameter at a time.
    own_clip = None
    if dtype == "fp32" and cfg.get("zero_optimization", {}).get("stage", 0) == 0:
        own_clip = cfg.get("gradient_clipping", 1.0)
        cfg["gradient_clipping"] = 0.0
    cfg.setdefault("steps_per_print", None)  # the script prints its own step lines
    for monitor in ("csv_monitor", "tensorboard"):  # DeepSpeed's monitors write into the run
        if cfg.get(monitor, {}).get("enabled") and not cfg[monitor].get("output_path"):
            cfg[monitor].update(output_path=f"{args.output_dir}/monitor", job_name=EXAMPLE)
    return cfg, dtype, own_clip


def fit_to_checkpoint(cfg, ckpt, world):
    """Resume with the checkpoint's global batch where accumulation can make up for another rank
    count, and a ZeRO checkpoint (optimizer state split by rank) in DeepSpeed's universal form."""
    old = ckpt.state["ds_config"]
    old_ranks = ckpt.state["dp_world_size"]
    micro = cfg["train_micro_batch_size_per_gpu"]
    was = [old["train_micro_batch_size_per_gpu"], old.get("gradient_accumulation_steps", 1)]
    was.append(old_ranks)
    ckpt.global_batch = math.prod(was)
    if ckpt.global_batch % (micro * world) == 0:
        cfg["gradient_accumulation_steps"] = ckpt.global_batch // (micro * world)
    now = [micro, cfg["gradient_accumulation_steps"], world]
    if now != was:
        change = "the same global batch"
        if math.prod(now) != ckpt.global_batch:
            change = f"the global batch changes from {ckpt.global_batch} to {math.prod(now)}"
        say(f"notice: the checkpoint's micro batch x accumulation x ranks was "
            f"{' x '.join(map(str, was))}, this run's is {' x '.join(map(str, now))}: {change}")
    ckpt.universal = old_ranks != world and old.get("zero_optimization", {}).get("stage", 0) > 0
    if ckpt.universal:
        refuse_what_ds_to_universal_cannot_convert(ckpt, old, world)
        cfg["checkpoint"] = {"load_universal": True}


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


def load_data(args, cfg, dtype, rank, world, device):
    """CIFAR-10 is held on the device as uint8 (184 MB). Each epoch every rank crops, flips and
    normalizes its shard there in one go and steps through it in slices: no per-step copies."""
    if args.dataset == "synthetic":  # generated alike on every rank: nothing to read
        say("Loading    : synthetic")
        dataset = (synthetic(5000, args.seed, 1), synthetic(1000, args.seed, 2), CLASSES)
    elif args.dataset == "cifar10":
        say(f"Loading    : cifar10 from {args.data_dir}")
        dataset = rank0_first(lambda: load_cifar10(args.data_dir), device)
    else:  # decoded once, then kept beside the data (or in --output-dir)
        say(f"Loading    : imagefolder from {args.data_dir}")
        cache = [args.data_dir, args.output_dir]
        dataset = rank0_first(lambda: load_imagefolder(args.data_dir, cache), device)
    (x, y), test, classes = dataset
    on = {"dtype": DTYPES[dtype], "rank": rank, "world": world, "device": device}
    val = None
    if args.val_split:  # a seeded choice of training images, the same on every rank
        if args.val_split >= len(y):
            raise UsageError(f"--val-split {args.val_split}: only {len(y)} training images")
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
        held, kept = order[:args.val_split], order[args.val_split:]
        val = DeviceBatches(x[held], y[held], TEST_BATCH, **on, prepare=normalize)
        x, y = x[kept], y[kept]
    micro = cfg["train_micro_batch_size_per_gpu"]
    train = DeviceBatches(x, y, micro, **on, prepare=augment, shuffle=True, seed=args.seed,
                          group=cfg["gradient_accumulation_steps"])
    test = DeviceBatches(*test, TEST_BATCH, **on, prepare=normalize)
    return SimpleNamespace(train=train, test=test, val=val, classes=classes)


class DeviceBatches:
    """Images in device memory, cut into this rank's batches. Shuffled, each rank takes an equal,
    distinct shard of a permutation seeded by (seed, epoch), else images rank, rank + world, ...;
    prepare() turns a shard into model inputs once an epoch; whole accumulation windows only."""

    def __init__(self, images, labels, size, dtype, rank, world, device, prepare, shuffle=False,
                 seed=0, group=1):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.size = size  # images per batch
        self.dtype = dtype
        self.rank = rank
        self.world = world
        self.prepare = prepare
        self.shuffle = shuffle
        self.seed = seed
        n = len(labels)
        self.shard = len(range(rank, n, world))  # images of this rank
        if shuffle:
            self.shard = n // world  # equal shards: every rank runs the same steps
        self.batches = math.ceil(self.shard / size) // group * group
        if self.batches == 0:
            raise UsageError(f"{n} images cannot fill a step of {size} x {group} x {world} ranks")

    def __len__(self):
        return self.batches

    def epoch(self, epoch):
        """This epoch's (images, labels) batches, model inputs on the device."""
        n = len(self.labels)
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        order = torch.arange(n)
        if self.shuffle:
            order = torch.randperm(n, generator=g)
        places = torch.arange(n)[self.rank::self.world][:self.shard]  # in the permutation
        idx = order[places].to(self.images.device)
        x = self.prepare(self.images[idx], g, places, n).to(self.dtype)
        y = self.labels[idx]
        b = self.size
        return [(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) for i in range(self.batches)]


def fill_schedule(cfg, args, steps_per_epoch):
    """WarmupCosineLR and WarmupDecayLR need the run's length in optimizer steps, which depends on
    the dataset, the epochs and this run's world size: the script fills it in."""
    if cfg.get("scheduler", {}).get("type") in ("WarmupCosineLR", "WarmupDecayLR"):
        params = cfg["scheduler"].setdefault("params", {})
        params["total_num_steps"] = total = max(1, args.epochs * steps_per_epoch)
        params["warmup_num_steps"] = max(1, min(total, round(args.warmup_epochs * steps_per_epoch)))


class CIFAR10CNNEnhanced(nn.Module):
    """conv(3->16, 3x3)+BN, pool, conv(16->32, 3x3)+BN, pool, fc(2048->128), fc(128->10)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, num_classes)
        for m in self.modules():  # Kaiming/He (fan_in) for ReLU layers; linear weights halved
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
                m.weight.data.mul_(0.5 if isinstance(m, nn.Linear) else 1.0)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))  # [B, 16, 16, 16]
        x = self.pool(F.relu(self.bn2(self.conv2(x))))  # [B, 32, 8, 8]
        return self.fc2(F.relu(self.fc1(x.flatten(1))))  # [B, 10] logits

    classes = CLASSES  # its outputs' names, carried in model.pt; main() sets the dataset's

    def get_extra_state(self):  # a tensor: DeepSpeed's ds_to_universal takes nothing else
        return torch.tensor(list(json.dumps(list(self.classes)).encode()), dtype=torch.uint8)

    def set_extra_state(self, state):
        self.classes = json.loads(bytes(state.byte().tolist()))


@dataclass
class RunState:
    """What a checkpoint carries besides weights, optimizer and LR schedule, so that --resume goes
    on as if the run had never stopped (data order and augmentation follow seed and epoch)."""
    epoch: int = 0  # epochs completed
    best_accuracy: float = -1.0  # on the --val-split images (selects model.pt), else on test
    best_epoch: int = 0
    best_loss: float = math.inf  # lowest epoch train loss, for early stopping
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
        self.patience_used += 1
        if row["train_loss"] < self.best_loss - args.min_improvement:
            self.patience_used = 0
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


def resume_run(engine, ckpt):
    """restore() with what 02 adds around it: a ZeRO checkpoint of another rank count is first
    converted to DeepSpeed's universal form (rank 0, once, beside the original); after it, the LR
    schedule goes on from the samples seen (the global batch may have changed), and the csv
    monitor forgets the rows past the checkpoint."""
    if ckpt.universal:
        if dist.get_rank() == 0 and not os.path.isdir(f"{ckpt.folder}/{ckpt.tag}_universal"):
            say(f"Converting : {ckpt.folder}/{ckpt.tag} to DeepSpeed's universal checkpoint")
            to_universal(f"{ckpt.folder}/{ckpt.tag}", f"{ckpt.folder}/{ckpt.tag}_universal")
        dist.barrier()  # every rank reads what rank 0 wrote
        ckpt.tag += "_universal"
    run = restore(engine, ckpt)
    samples = ckpt.state["global_samples"]
    if engine.train_batch_size() != ckpt.global_batch and engine.lr_scheduler:
        engine.lr_scheduler.last_batch_iteration = samples // engine.train_batch_size() - 1
    monitor_resumes_at(engine, samples)
    return run


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


def to_universal(src, dst):
    """What `python -m deepspeed.checkpoint.ds_to_universal --input_folder SRC --output_folder DST
    --inject_missing_state` writes (this model needs the flag), into a folder renamed at the end."""
    from deepspeed.checkpoint import ds_to_universal

    tmp = f"{dst}.tmp{os.getpid()}"
    opts = SimpleNamespace(input_folder=src, output_folder=tmp, num_extract_workers=1, strict=True,
                           num_merge_workers=1, keep_temp_folder=False, inject_missing_state=True)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        with contextlib.redirect_stderr(quiet):  # its progress bars
            ds_to_universal.main(opts)
    os.replace(tmp, dst)


def print_banner(args, cfg, dtype, own_clip, engine, data):
    """The run's sizes, computed, never typed in; rank 0 prints them before training."""
    world = dist.get_world_size()
    gas = engine.gradient_accumulation_steps()
    clip = engine.gradient_clipping()
    if own_clip is not None:
        clip = f"{own_clip:g} (by the script)"
    images = f"{len(data.train.labels):,} train / {len(data.test.labels):,} test"
    if data.val:
        images += f" / {args.val_split:,} validation"
    sched = cfg.get("scheduler", {})
    say("=" * 80, f"DeepSpeed CNN training: {EXAMPLE}", "=" * 80,
        f"Dataset    : {args.dataset}, {images} images, {len(data.classes)} classes; "
        "crops and flips on the device",
        f"Model      : CIFAR10CNNEnhanced, "
        f"{sum(p.numel() for p in engine.module.parameters()):,} parameters",
        f"Precision  : {dtype} | ZeRO stage {engine.zero_optimization_stage()} | "
        f"gradient clipping {clip} | device {engine.device.type} | world size {world}",
        f"Batch      : {cfg['train_micro_batch_size_per_gpu']} per rank x {gas} accumulation x "
        f"{world} ranks = {engine.train_batch_size()} global; {len(data.train) // gas} steps/epoch",
        f"Schedule   : {args.epochs} epochs, {cfg['optimizer']['type']} lr "
        f"{cfg['optimizer'].get('params', {}).get('lr')}, "
        f"{sched.get('type', 'constant')} {json.dumps(sched.get('params', {}))}",
        f"Output     : {os.path.abspath(args.output_dir)}", "-" * 80)


def train_one_epoch(engine, data, run, args, own_clip):
    """One pass over this rank's shard. Losses, hits, grad norms and images are summed on the
    device, and whether a step was applied stays there too: the host reads them (summed over
    ranks) only for a step line and at the epoch's end."""
    gas = engine.gradient_accumulation_steps()
    window = Tally(engine.device)  # the micro-batches of one optimizer step
    line = Tally(engine.device)  # the steps since the last step line
    epoch = Tally(engine.device)
    stats = list(engine.module.buffers())  # BatchNorm statistics (and its batch counter)
    saved = [b.clone() for b in stats]
    for i, (x, y) in enumerate(train_batches(data, run.epoch)):
        boundary = i % gas == gas - 1  # counted here, so that a skipped step cannot shift windows
        engine.set_gradient_accumulation_boundary(boundary)
        if i % gas == 0:  # a skipped step must not keep the BatchNorm update of its forward passes
            torch._foreach_copy_(saved, stats)
        loss, logits = forward_loss(engine, x, y, args)
        with reduce_unless_alone(engine):
            engine.backward(loss)
        window.sums[:2] += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum()])
        window.sums[3] += len(y)
        if not boundary:
            engine.step()  # no update yet: DeepSpeed accumulates the gradients
            continue
        window.sums[2], applied = optimizer_step(engine, own_clip)
        window.sums[4] = 1
        line.add(window, applied)
        epoch.add(window, applied)
        for b, s in zip(stats, saved):  # a skipped step: its statistics go back
            torch.where(applied, b, s, out=b)
        window.clear()
        if engine.global_steps % args.log_interval == 0:
            print_step(engine, run, line, args)
            line.clear()
        if 0 < args.max_steps <= engine.global_steps:
            break
    for b in filter(torch.is_floating_point, stats):  # DeepSpeed, unlike DDP, does not sync
        dist.all_reduce(b)  # buffers: average the statistics over ranks
        b.div_(dist.get_world_size())
    loss, acc, norm, images, skipped = epoch.means(args, run)
    seconds = time.time() - epoch.start
    return {"train_loss": loss, "train_accuracy": acc, "grad_norm": norm, "skipped_steps": skipped,
            "train_images": images, "epoch_time_s": seconds, "images_per_s": images / seconds}


def train_batches(data, epoch):
    """This rank's training micro-batches of one epoch, on the device."""
    return data.train.epoch(epoch)


def forward_loss(model, images, labels, args):
    """Cross-entropy on fp32 logits (the model may compute in bf16/fp16): (loss, logits)."""
    logits = model(images).float()
    return F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing), logits


def optimizer_step(engine, own_clip):
    """The update that ends an accumulation window: (grad norm, applied), both on the device. A
    step with non-finite gradients is skipped, on every rank alike (the gradients are global)."""
    if own_clip is None:  # DeepSpeed checks (fp16, bf16, ZeRO) and reports the norm
        skipped = engine.skipped_steps
        engine.step()
        applied = engine.skipped_steps == skipped
        norm = engine.get_global_grad_norm() if applied else 0.0
        return norm, torch.full((), applied, device=engine.device)  # a fill, no copy
    # fp32 without ZeRO: DeepSpeed neither checks nor reports, so the script does (load_config)
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)  # the gradients are all-reduced already
    applied = norm.isfinite()
    if own_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(engine.module.parameters(), own_clip, norm)
    if hasattr(engine.optimizer, "found_inf"):  # skip_on_the_device set it: the fused kernel
        engine.optimizer.found_inf = (~applied).float()  # skips the update where it is 1
    elif not applied:  # a host read each step (about 0.6 ms on an H100 for the fast recipe)
        engine.zero_grad()
        return norm, applied
    engine.step()
    return norm, applied


def print_step(engine, run, line, args):
    """A step line: global means since the last one; the same to DeepSpeed's monitors."""
    loss, acc, norm, images, _ = line.means(args, run)
    images_per_s = images / (time.time() - line.start)
    say(f"  step {engine.global_steps:6d} | epoch {run.epoch + 1:3d} | loss {loss:.4f} | "
        f"acc {acc:6.2f}% | grad norm {norm:.4f} | lr {engine.get_lr()[0]:.3e} | "
        f"{images_per_s:,.0f} img/s")
    record(engine, "Train", {"train_loss": loss, "train_accuracy": acc, "grad_norm": norm})


def record(engine, group, values, wandb_run=None):
    """Metrics for DeepSpeed's monitors (csv, TensorBoard: on when the config enables them), indexed
    by samples seen like DeepSpeed's own rows, and for W&B."""
    if engine.monitor.enabled:
        engine.monitor.write_events([(f"{group}/Samples/{k}", v, engine.global_samples)
                                     for k, v in values.items()])
    if wandb_run:
        wandb_run.log({f"{group}/{k}": v for k, v in values.items()}, step=engine.global_samples)


@torch.no_grad()
def evaluate(engine, batches, classes, args):
    """Global loss, accuracy and per-class accuracy (%) over the rank-sharded images."""
    engine.eval()
    k = len(classes)
    sums = torch.zeros(1 + 2 * k, dtype=torch.float64, device=engine.device)
    for x, y in batches.epoch(0):
        logits = predict(engine, x, args)
        sums[0] += F.cross_entropy(logits, y, reduction="sum")
        sums[1:1 + k].index_add_(0, y, (logits.argmax(1) == y).double())
        sums[1 + k:].index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    dist.all_reduce(sums)
    engine.train()
    hits, seen = sums[1:1 + k], sums[1 + k:]
    n = seen.sum().item()
    return {"loss": sums[0].item() / n, "accuracy": 100 * hits.sum().item() / n, "images": int(n),
            "per_class": (100 * hits / seen.clamp(min=1)).tolist()}


def predict(model, images, args):
    """Logits for evaluation; with --tta-flip averaged over each image and its mirror image."""
    logits = model(images).float()
    if args.tta_flip:
        logits = (logits + model(images.flip(3)).float()) / 2
    return logits


def save_epoch(engine, run, args, cfg, own_clip, write_model):
    """Every rank: the DeepSpeed checkpoint (ZeRO writes a shard per rank), and the plain weights
    where write_model. Rank 0: model.pt, then the `latest` pointer by rename (a crash mid-save
    leaves the previous checkpoint in force) and metrics.json; only the latest and best epochs'
    checkpoints are kept."""
    ckpt = f"{args.output_dir}/checkpoints"
    tag = f"epoch{run.epoch:04d}"
    run.rng = {"cpu": torch.get_rng_state(), "device": get_accelerator().get_rng_state()}
    weights = plain_weights(engine) if write_model else None  # a collective under ZeRO-3
    if weights and dist.get_rank() == 0:
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
        write_metrics(args, cfg, own_clip, run)
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


# ===== plumbing: error reporting, the output directory, atomic writes, data files and pixels,
# config checks, W&B and plots. Nothing here is needed to follow the DeepSpeed story above.
class Stopwatch:
    """Seconds spent between named marks of one run, summed per name."""

    def __init__(self):
        self.last = time.time()
        self.laps = {}

    def lap(self, name):
        now = time.time()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now

    def line(self):
        """`phases: setup 1.93 data 0.61 ...`, seconds in the order the marks came."""
        return "phases: " + " ".join(f"{name} {s:.2f}" for name, s in self.laps.items())


def skip_on_the_device(optimizer, own_clip):
    """Where the script skips non-finite steps (fp32 without ZeRO), torch's fused SGD, Adam and
    AdamW ("fused": true in the config) do it without a host read: they skip an update while
    their `found_inf` is 1, as under torch's GradScaler. Fused SGD makes its momentum buffers
    uninitialized and fills them in its first update; one skipped would leave them so. Zeros
    give that first update the same result (buffer = gradient, without dampening)."""
    groups = optimizer.param_groups
    if own_clip is None or not all(g.get("fused") and not g.get("dampening") for g in groups):
        return
    optimizer.found_inf = torch.zeros((), device=groups[0]["params"][0].device)
    for group in groups:
        for p in group["params"] if group.get("momentum") else ():
            optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


class Tally:
    """Sums on the device of loss x images, hits, grad norms, images and applied steps, with
    the skipped steps beside them, and when they began."""

    def __init__(self, device):
        self.sums = torch.zeros(5, device=device)
        self.skipped = torch.zeros((), device=device)
        self.clear()

    def clear(self):
        self.sums.zero_()
        self.skipped.zero_()
        self.start = time.time()

    def add(self, window, applied):
        """An optimizer step's window; a skipped one's sums (its loss may be NaN) count as 0."""
        self.sums += torch.where(applied, window.sums, 0)
        self.skipped += ~applied

    def means(self, args, run):
        """(loss, accuracy %, grad norm, images, skipped steps) over all ranks: a collective. The
        gradients are global, so every rank skipped the same steps; too many end the run."""
        total = self.sums.double()
        dist.all_reduce(total)
        loss, hits, norm, images, steps = total.tolist()
        skipped = int(self.skipped.item())
        if skipped >= args.max_bad_steps:
            raise TrainingDiverged(
                f"training diverged: {skipped} non-finite steps in epoch {run.epoch + 1}; nothing "
                "was learned from them.\n  check: the data for NaN/Inf, a lower learning rate, "
                "gradient_clipping > 0, --dtype fp32 or bf16")
        accuracy = 100 * hits / max(images, 1)
        return loss / max(images, 1), accuracy, norm / max(steps, 1), int(images), skipped


def run(argv=None):
    """main() as a command: exit code 2 for a user's mistake (one or two lines), 3 for divergence,
    130 for Ctrl-C, 143 for SIGTERM (also when the launcher or another rank is gone); a stopped
    run names its last checkpoint and the command that continues it."""
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    watch_launcher()
    quiet_known_messages()
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
        if rank0 and args:
            print_how_to_resume(args)
    finally:
        if dist.is_initialized():
            if code == 0:  # every rank waits for rank 0's last files before tearing down
                dist.barrier()
            dist.destroy_process_group()
        release_shm_buffer()
        release_output_dir(args)
    return code


def print_how_to_resume(args):
    """The epoch a stopped run's `latest` checkpoint holds, and the command that continues the run:
    --resume takes every other flag from the checkpoint. Nothing before the first checkpoint."""
    latest = f"{args.output_dir}/checkpoints/latest"
    if not os.path.isfile(latest):
        return
    with open(latest) as f:
        epoch = int(f.read().strip()[5:])  # "epoch0004"
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_SIZE", world))  # this node's ranks (DeepSpeed's launcher)
    launcher = f"deepspeed --num_gpus={local}"
    if "LOCAL_RANK" not in os.environ:  # plain `python`, one process
        launcher = "python"
    elif world > local:  # several nodes
        launcher = "deepspeed --hostfile=HOSTFILE"
    script = shlex.quote(sys.argv[0])
    print(f"stopped: epoch {epoch} is checkpointed in {os.path.dirname(latest)}; to continue: "
          f"{launcher} {script} --output-dir {shlex.quote(args.output_dir)} --resume",
          file=sys.stderr)


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


def say(*lines):
    """Print on global rank 0 only (the launcher's RANK; plain `python` is rank 0)."""
    if os.environ.get("RANK", "0") == "0":
        print(*lines, sep="\n", flush=True)


def first_line(e):
    """One line about any exception, also one with an empty message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


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


def check_args(args):
    """Flag values that argparse's types let through: one line naming the flag and the range."""
    lowest = {"epochs": 1, "patience": 1, "log_interval": 1, "max_bad_steps": 1, "max_steps": 0,
              "val_split": 0, "warmup_epochs": 0, "min_improvement": 0}
    for name, low in lowest.items():
        value = getattr(args, name)
        if value < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, not {value}")
    if not 0 <= args.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), not {args.label_smoothing}")


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
    # Under ZeRO each rank holds its part of the optimizer state: fit_to_checkpoint converts it
    # for another rank count.
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
    from the start, middle and end of 256 of them at most. Generated data: --seed and its size."""
    if args.dataset == "synthetic":
        return f"generated, size {vars(args).get('synthetic_size', 'fixed')}"
    root = os.path.join(args.data_dir, DATA_FILES[args.dataset])
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                   if not f.startswith("."))  # not the decoded-image caches
    listing = [(os.path.relpath(path, root), os.path.getsize(path)) for path in files]
    digest = hashlib.sha256(repr(listing).encode())
    for path, (_, size) in list(zip(files, listing))[::max(1, len(files) // 256)]:
        with contextlib.suppress(OSError), open(path, "rb") as f:  # unreadable: the loader says so
            for at in (0, size // 2, max(0, size - 4096)):
                f.seek(at)
                digest.update(f.read(4096))
    return f"{len(files)} files, {digest.hexdigest()[:12]}"


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


def check_config(cfg, path):
    """What DeepSpeed lets through (it checks the rest once the process group is up:
    check_with_deepspeed, deepspeed.initialize), and the keys this script reads before it starts.
    Each message names the key, the value and what is allowed."""
    def need(ok, key, value, allowed):
        if not ok:
            raise UsageError(f"{path}: {key} = {json.dumps(value)}: allowed: {allowed}")

    for key in ("scheduler", "zero_optimization", "fp16", "bf16", "torch_autocast", "csv_monitor",
                "tensorboard"):  # the optimizer: read_config
        need(isinstance(cfg.get(key, {}), dict), key, cfg.get(key), "a JSON object {...}")
    cfg.setdefault("gradient_accumulation_steps", 1)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):  # resume, data
        value = cfg.get(key)
        need(type(value) is int and value > 0, key, value, "a positive integer")
    clip = cfg.get("gradient_clipping", 0)  # DeepSpeed does not check its type
    need(type(clip) in (int, float) and clip >= 0, "gradient_clipping", clip,
         "a number >= 0 (0: off)")
    need(not cfg.get("torch_autocast", {}).get("enabled"), "torch_autocast.enabled", True,
         "false; this script uses DeepSpeed's bf16 or fp16 section (or --dtype) instead")
    tensorboard = cfg.get("tensorboard", {}).get("enabled")
    need(not tensorboard or importlib.util.find_spec("tensorboard"), "tensorboard.enabled", True,
         "false, or pip install tensorboard (not installed)")
    check_keys_deepspeed_reads(cfg, path)


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


def augment(images, g, places, n):
    """Random 32x32 crops of the images zero-padded by 4 px (as torchvision's RandomCrop(32, 4))
    and horizontal flips, for a whole shard: 18 masked copies an epoch instead of work per step.
    Drawn per place in the epoch's permutation: any world size, or a resumed run, gets the same."""
    shifts = torch.randint(0, 9, (n, 2), generator=g)[places].to(images.device)  # rows, columns
    flips = (torch.rand(n, generator=g) < 0.5)[places].to(images.device)
    padded = F.pad(images, (4, 4, 4, 4))
    rows = images.new_empty(len(images), 3, 32, 40)
    out = torch.empty_like(images)
    for d in range(9):
        rows[shifts[:, 0] == d] = padded[shifts[:, 0] == d, :, d:d + 32]
    for d in range(9):
        out[shifts[:, 1] == d] = rows[shifts[:, 1] == d, :, :, d:d + 32]
    return normalize(torch.where(flips.view(-1, 1, 1, 1), out.flip(3), out))


def normalize(images, *_):
    """uint8 pixels to the per-channel standardized floats the model trains on."""
    from torchvision.transforms.functional import normalize as standardize

    return standardize(images.float() / 255, MEAN, STD)


def write_metrics(args, cfg, own_clip, run, final=None):
    doc = {"example": EXAMPLE, "world_size": dist.get_world_size(), "config": cfg,
           "gradient_clipping_by_script": own_clip, "epochs": run.history, "final": final,
           "args": {k: v for k, v in vars(args).items() if k != "local_rank"}}
    atomic_write(f"{args.output_dir}/metrics.json", lambda t: open(t, "w").write(json.dumps(doc)))


def synthetic(n, seed, split):
    """n uint8 images in 10 classes: a smooth colour pattern per class (from seed), shifted by up
    to 4 px, scaled in contrast and buried in noise. Learnable, offline; not CIFAR-10."""
    protos = torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    protos = F.interpolate(protos, 32, mode="bilinear")
    protos = (protos - protos.mean((1, 2, 3), keepdim=True)) / protos.std((1, 2, 3), keepdim=True)
    g = torch.Generator().manual_seed(seed * 1000 + split)
    labels = torch.randint(0, 10, (n,), generator=g)
    shift = torch.randint(-4, 5, (n, 2), generator=g)  # pixels down and right
    x = protos[labels]
    for a in range(-4, 5):  # roll each image by its own shift: one roll per distinct shift
        for b in range(-4, 5):
            sel = (shift[:, 0] == a) & (shift[:, 1] == b)
            x[sel] = x[sel].roll((a, b), (2, 3))
    x = x * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g))  # contrast
    x = x + 3 * torch.randn(x.shape, generator=g)  # noise of 3x the patterns' std
    return (128 + 25 * x).clamp(0, 255).to(torch.uint8), labels


def load_cifar10(data_dir):
    """torchvision's CIFAR-10 files (it checks their md5 sums) as uint8 [N, 3, 32, 32] tensors."""
    from torchvision.datasets import CIFAR10

    try:
        sets = [CIFAR10(data_dir, train=train, download=True) for train in (True, False)]
    except Exception as e:  # noqa: BLE001 - offline, corrupt or missing files: all user-facing
        raise UsageError(f"CIFAR-10 is not in {data_dir} (or is corrupted) and could not be "
                         f"downloaded ({first_line(e)[:80]}).\nFetch https://www.cs.toronto.edu/"
                         f"~kriz/cifar-10-python.tar.gz and unpack it in {data_dir}, or use "
                         "--dataset synthetic") from None
    return *[(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets))
             for s in sets], CLASSES


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


def load_imagefolder(root, cache_dirs):
    """root/{train,test}/<class>/<image>, the same class folders in both (sorted, they give the
    labels). Every image is decoded once, which also checks it; the result is kept beside the data
    (or in --output-dir) under a key of the files' names, sizes and times: later runs load it."""
    files = {}  # split: [(path, label)]
    classes = {}  # split: class folder names, sorted
    for split in ("train", "test"):
        d = os.path.join(root, split)
        found = []
        if os.path.isdir(d):
            found = sorted(e.name for e in os.scandir(d) if e.is_dir())
        classes[split] = found
        files[split] = [(e.path, label) for label, c in enumerate(classes[split])
                        for e in sorted(os.scandir(os.path.join(d, c)), key=lambda e: e.name)]
        labels = {label for _, label in files[split]}
        empty = [c for label, c in enumerate(found) if label not in labels]
        if not files[split] or empty:
            raise UsageError(f"--dataset imagefolder: no images in {os.path.join(d, *empty[:1])}"
                             f" (expected {root}/{{train,test}}/<class>/<image>)")
    if classes["train"] != classes["test"]:
        raise UsageError("--dataset imagefolder: class folders differ between train/ ("
                         f"{', '.join(classes['train'])}) and test/ ({', '.join(classes['test'])})")
    paths = [path for split in files.values() for path, _ in split]
    key = hashlib.sha256("".join(f"{os.path.relpath(p, root)}:{s.st_size}:{s.st_mtime_ns};"
                                 for p in paths for s in [os.stat(p)]).encode()).hexdigest()[:16]
    caches = [os.path.join(d, f".decoded-{key}.pt") for d in cache_dirs]
    images = next((x for x in map(read_cache, caches) if x is not None), None)
    if images is None:
        images = decode_images(paths)
        kept = {"images": images, "sha256": hashlib.sha256(images.numpy()).hexdigest()}
        for cache in caches:  # beside the data if that is writable, else in --output-dir
            with contextlib.suppress(UsageError):
                atomic_write(cache, lambda tmp: torch.save(kept, tmp))
                break
    labels = torch.tensor([label for split in files.values() for _, label in split])
    n = len(files["train"])
    return (images[:n], labels[:n]), (images[n:], labels[n:]), classes["train"]


def read_cache(path):
    """The images kept in `path` if their sha256 verifies; a file that does not
    (empty, cut short, changed, not a cache) is named in a notice, and the caller rebuilds it."""
    with contextlib.suppress(Exception):  # whatever is wrong with the file, decoding repairs it
        kept = torch.load(path, weights_only=True)
        if kept["sha256"] == hashlib.sha256(kept["images"].numpy()).hexdigest():
            return kept["images"]
    if os.path.exists(path):
        say(f"Cache      : {path} does not verify; decoding the images again")
    return None


def decode_images(paths):
    """The images as one uint8 [N, 3, 32, 32] tensor; many are decoded by a pool of processes."""
    import multiprocessing

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(16, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), len(paths) // 1000)
    if workers < 2:
        pixels = list(map(decode_image, paths))
    else:  # close and join, not terminate: a worker killed while holding the queue's lock hangs
        pool = multiprocessing.get_context("fork").Pool(workers)
        pixels = pool.map(decode_image, paths, chunksize=256)
        pool.close()
        pool.join()
    bad = next((p for p, px in zip(paths, pixels) if px is None), None)
    if bad:
        raise UsageError(f"--dataset imagefolder: cannot read image {bad}; remove or replace it")
    flat = torch.frombuffer(bytearray(b"".join(pixels)), dtype=torch.uint8)
    return flat.view(-1, 32, 32, 3).permute(0, 3, 1, 2).contiguous()


def decode_image(path):
    """RGB pixels of one image, resized to 32x32 if needed; None if it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB").resize((32, 32), Image.BILINEAR).tobytes()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def epoch_line(row, args, best):
    """The line that ends an epoch: global numbers, the same on every rank."""
    parts = [f"epoch {row['epoch']:3d}/{args.epochs}",
             f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:6.2f}%"]
    if "val_accuracy" in row:
        parts.append(f"val acc {row['val_accuracy']:6.2f}%")
    parts += [f"test loss {row['test_loss']:.4f} acc {row['test_accuracy']:6.2f}%",
              f"grad norm {row['grad_norm']:.4f}", f"lr {row['lr']:.3e}",
              f"skipped {row['skipped_steps']}",
              f"{row['epoch_time_s']:.1f}s {row['images_per_s']:,.0f} img/s"]
    if best:
        parts.append("best")
    return " | ".join(parts)


def report(run, test, data, args, cfg, own_clip, wandb_run, model_saved):
    """The final summary, rated on held-out test accuracy, with train accuracy beside it."""
    last = run.history[-1]
    tier_text = quality(last["test_accuracy"])
    model_epoch = run.epoch  # model.pt: the last epoch, or the best on --val-split images
    chosen = "the last"
    if data.val:
        model_epoch = run.best_epoch
        chosen = "the best on --val-split"
    final = {"test_accuracy": last["test_accuracy"], "train_accuracy": last["train_accuracy"],
             "best_test_accuracy": max(h["test_accuracy"] for h in run.history),
             "best_epoch": run.best_epoch, "model_epoch": model_epoch,
             "selected_on": "val" if data.val else "last",
             "test_loss": last["test_loss"], "train_loss": last["train_loss"],
             "quality": tier_text[0], "epochs_completed": run.epoch,
             "stopped_early": run.epoch < args.epochs and run.patience_used >= args.patience,
             "skipped_steps": run.skipped_steps, "wall_time_s": run.wall_time_s,
             "classes": data.classes,
             "per_class_accuracy": dict(zip(data.classes, test["per_class"]))}
    if dist.get_rank() == 0:
        write_metrics(args, cfg, own_clip, run, final)
        plotted = plot_curves(run.history, f"{args.output_dir}/curves.png")
        saved = "metrics.json"  # and what else this run wrote, and why a file is missing
        if model_saved:
            saved = "model.pt, " + saved
        if plotted:
            saved += ", curves.png"
        else:
            saved += " (pip install matplotlib for curves.png)"
        if not model_saved:
            saved += f"; model.pt not written: no epoch beat epoch {model_epoch}"
        say("=" * 80, f"Training finished: {run.epoch} epochs, {run.wall_time_s:.1f}s wall",
            f"  train loss     {run.history[0]['train_loss']:.4f} -> {last['train_loss']:.4f}",
            f"  train accuracy {last['train_accuracy']:.2f}%",
            f"  test accuracy  {last['test_accuracy']:.2f}% (best {final['best_test_accuracy']:.2f}"
            f"%; model.pt: epoch {model_epoch}, {chosen})",
            *[f"  accuracy of {c:10s}: {a:6.2f}%" for c, a in zip(data.classes, test["per_class"])],
            f"Quality (held-out test accuracy): {tier_text[0]}: {tier_text[1]}",
            f"Saved: {args.output_dir}/{saved}")
    if wandb_run:
        wandb_run.summary.update(final)
        wandb_run.finish()


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


def quality(accuracy):
    """(tier, what it means) for a held-out test accuracy in %, on this example's QUALITY floors."""
    floor, tier = next(level for level in QUALITY if accuracy >= level[0])  # the last floor is 0
    if floor > 0:
        return tier, f"at least {floor}% of held-out test images classified correctly"
    return tier, f"under {QUALITY[-2][0]}% right: train longer or revisit the learning rate"


# ======================================================= DeepSpeed 0.19.8 workarounds
def refuse_fp16_without_zero(cfg, path):
    """fp16 without ZeRO divides every update by the loss scale without having scaled the loss
    (DeepSpeed 0.18.3-0.19.x, runtime/engine.py; fix pending: deepspeedai/DeepSpeed#8393)."""
    if cfg.get("fp16", {}).get("enabled") and cfg.get("zero_optimization", {}).get("stage", 0) == 0:
        raise UsageError(f"{path}: fp16 needs zero_optimization.stage >= 1 in DeepSpeed 0.19 "
                         "(without ZeRO its updates shrink); add a ZeRO stage or use --dtype bf16")


def batchnorm_buffers_follow_precision(cfg, dtype):
    """Since 0.19.2 (#8066) the fp16/bf16 sections cast parameters but not buffers, and BatchNorm's
    backward then fails on fp32 running statistics; data_types.buffer_dtype casts them too."""
    if dtype != "fp32":
        cfg.setdefault("data_types", {})["buffer_dtype"] = dtype


def check_keys_deepspeed_reads(cfg, path):
    """DeepSpeed ignores top-level keys it does not know, so a typo goes unnoticed: let its parser
    read the config and note each key it looks up. An invalid config is left to DeepSpeed's
    own check (check_with_deepspeed), which names the problem once the ranks are up."""
    asked = set()

    class Recorder(dict):
        def get(self, key, default=None):
            asked.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            asked.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            asked.add(key)
            return super().__contains__(key)

        def keys(self):  # DeepSpeed also asks `key in config.keys()`
            return self

    try:
        DeepSpeedConfig(Recorder(json.loads(json.dumps(cfg))))
    except Exception:  # noqa: BLE001 - any error: DeepSpeed reports it again, in one line
        return
    unknown = sorted(set(cfg) - asked)
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; DeepSpeed would ignore "
                         "them (a typo? see https://www.deepspeed.ai/docs/config-json/)")


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


def refuse_what_ds_to_universal_cannot_convert(ckpt, old, world):
    """ds_to_universal (checkpoint/ds_to_universal.py) reads Adam's exp_avg and exp_avg_sq at every
    ZeRO stage: another optimizer's ZeRO checkpoint ends there in a KeyError."""
    kind = old.get("optimizer", {}).get("type")
    ranks = ckpt.state["dp_world_size"]
    if str(kind).lower() not in ("adam", "adamw"):
        raise UsageError(f"--resume: {ckpt.folder}/{ckpt.tag} is {kind} under ZeRO stage "
                         f"{old['zero_optimization']['stage']} on {ranks} ranks, which DeepSpeed's "
                         f"ds_to_universal cannot convert for {world}: resume on {ranks} ranks, or "
                         "train with Adam/AdamW or ZeRO stage 0 to change the rank count")


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


def reduce_unless_alone(engine):
    """DeepSpeed all-reduces the gradients after every backward, even with one rank and no ZeRO;
    its public no_sync() skips that."""
    alone = dist.get_world_size() == 1 and engine.zero_optimization_stage() == 0
    return engine.no_sync() if alone else contextlib.nullcontext()


def monitor_resumes_at(engine, samples):
    """DeepSpeed's csv monitor appends, and writes a file's header again in a new process: on
    resume, drop the rows past the checkpoint and tell it the headers are there."""
    csv = engine.monitor.csv_monitor  # None unless the config enables it
    if csv is None or dist.get_rank() != 0:
        return
    for path in glob.glob(f"{csv.log_dir}/*.csv"):
        with open(path) as f:
            header, *rows = f.readlines()
        kept = [row for row in rows if int(float(row.split(",")[0])) <= samples]
        atomic_write(path, lambda tmp: open(tmp, "w").writelines([header, *kept]))
        csv.filenames.append(os.path.basename(path)[: -len(".csv")])


def release_shm_buffer():
    """Without GPUs, DeepSpeed's shm all-reduce never unlinks the ~66 MB /dev/shm buffer each rank
    creates; every peer has mapped it by now, so removing the name at exit is safe."""
    env = os.environ
    name = f"{os.getuid()}_{env.get('MASTER_ADDR')}_{env.get('MASTER_PORT')}_{env.get('RANK')}"
    with contextlib.suppress(OSError):
        os.remove(f"/dev/shm/deepspeed_allreduce_buffer_{name}")


if __name__ == "__main__":
    sys.exit(run())
