"""Example 02: CIFAR10CNNEnhanced (2 conv + BatchNorm) on 32x32 colour images, trained with DeepSpeed.

Launch (ds_config.json is found next to this file, whatever the working directory):
  deepspeed --num_gpus=1 train_ds.py                    # one GPU; downloads CIFAR-10 into ./data
  deepspeed --num_gpus=4 train_ds.py                    # four GPUs, same config, 4x the global batch
  deepspeed --hostfile=hostfile --num_nodes=2 --num_gpus=8 train_ds.py   # two nodes (see README)
  torchrun --nproc_per_node=2 train_ds.py               # torchrun works too
  python train_ds.py --dataset synthetic                # one process, no launcher, no download (CPU ok)
  deepspeed --num_gpus=1 train_ds.py --dataset imagefolder --data-dir DIR   # DIR/{train,test}/<class>/*
  deepspeed --num_gpus=1 train_ds.py --deepspeed_config ds_config_fast.json --epochs 30 --label-smoothing 0.1
  deepspeed --num_gpus=1 train_ds.py --resume           # continue the run in --output-dir
Outputs land in --output-dir (default runs/02_cifar10): checkpoints/ (DeepSpeed, latest and
best epoch), model.pt (plain PyTorch state dict of the best model), metrics.json, curves.png.
"""

import argparse
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
import warnings

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator

EXAMPLE = "02_cifar10"
HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
INPUT_SHAPE = (3, 32, 32)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the seed's CIFAR-10 normalization
# DeepSpeed 0.19.8's ZeRO calls an all_gather that torch >= 2.14 flags as deprecated, once per rank.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
# On a machine without CUDA, building DeepSpeed's CPU comm op logs "No CUDA runtime is found" per rank.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


class UsageError(Exception):
    """A mistake in flags, files or data: reported in one line, exit code 2, no traceback."""


# ============================================================================ settings
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's multi-line usage dump
        raise UsageError(f"{message} (see --help)")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=50, help="training epochs (the cosine schedule spans them)")
    p.add_argument("--warmup-epochs", type=float, default=5, help="linear LR warmup, in epochs")
    p.add_argument("--dataset", choices=["cifar10", "imagefolder", "synthetic"], default="cifar10",
                   help="cifar10: torchvision CIFAR-10 in --data-dir (downloaded); imagefolder: --data-dir/"
                        "{train,test}/<class>/<image>; synthetic: generated offline from --seed")
    p.add_argument("--data-dir", default="./data", help="where datasets are read from / downloaded to")
    p.add_argument("--output-dir", default=f"runs/{EXAMPLE}", help="checkpoints, model.pt, metrics.json")
    p.add_argument("--seed", type=int, default=42, help="seeds init, synthetic data and shuffling")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="override the config's precision; auto keeps it")
    p.add_argument("--val-split", type=int, default=0,
                   help="hold out this many training images as validation; the best checkpoint is then "
                        "chosen on them, not on test (0: select on test, as the seed did)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing, 0-1")
    p.add_argument("--tta-flip", action="store_true",
                   help="evaluate on each image and its mirror image, averaging the logits")
    p.add_argument("--patience", type=int, default=15, help="early stopping: epochs without train-loss gain")
    p.add_argument("--min-improvement", type=float, default=1e-5, help="early stopping: smallest loss gain")
    p.add_argument("--max-bad-steps", type=int, default=100,
                   help="stop with a diagnosis after this many non-finite steps in a row")
    p.add_argument("--log-interval", type=int, default=50, help="optimizer steps between step lines")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue from the latest checkpoint in DIR (default: --output-dir)")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (also on if WANDB_API_KEY is set)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # launcher's
    p = deepspeed.add_config_arguments(p)  # --deepspeed, --deepspeed_config PATH
    args = p.parse_args(argv)
    for name in ("epochs", "patience", "log_interval", "max_bad_steps"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.max_steps < 0 or args.warmup_epochs < 0 or args.min_improvement < 0 or args.val_split < 0:
        raise UsageError("--max-steps, --warmup-epochs, --min-improvement and --val-split cannot be negative")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    args.deepspeed_config = args.deepspeed_config or os.path.join(HERE, "ds_config.json")
    return args


# ============================================================================ model
class CIFAR10CNNEnhanced(nn.Module):
    """conv(3->16, 3x3)+BN -> pool -> conv(16->32, 3x3)+BN -> pool -> fc(2048->128) -> fc(128->10)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, num_classes)
        for m in self.modules():  # Kaiming/He fan_in (ReLU) as in the seed; linear weights halved
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
                if isinstance(m, nn.Linear):
                    m.weight.data.mul_(0.5)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))  # [B, 16, 16, 16]
        x = self.pool(F.relu(self.bn2(self.conv2(x))))  # [B, 32, 8, 8]
        x = F.relu(self.fc1(torch.flatten(x, 1)))  # [B, 128]
        return self.fc2(x)  # [B, 10] logits


def build_model(num_classes=10):
    return CIFAR10CNNEnhanced(num_classes=num_classes)


def forward_loss(model, images, labels, args):
    """Cross-entropy (with --label-smoothing) on fp32 logits; under torch_autocast the convs and linears
    run in bf16/fp16 inside the engine's forward. Returns (loss, logits)."""
    logits = model(images).float()
    return F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing), logits


def master_weights(engine):
    """The model's fp32 weights as a plain state dict. Under fp16/bf16 the module holds rounded copies;
    the optimizer's fp32 master copy is the real model. Collective under ZeRO: call on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
             for k, v in engine.module.state_dict().items()}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is not None:
            state[name] = full.detach().float().cpu()
    return state


# ============================================================================ data
def synthetic_cifar(n, seed, split):
    """n uint8 images [n, 3, 32, 32] in 10 classes: a fixed smooth colour prototype per class (from seed),
    shifted by up to 4 px, scaled in contrast (0.6-1.4), plus Gaussian noise of 3x the prototypes' std.
    Learnable: a smoke test of the whole pipeline offline, not a benchmark."""
    proto_gen = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.randn(10, 3, 4, 4, generator=proto_gen), size=32, mode="bilinear")
    protos = (protos - protos.mean((1, 2, 3), keepdim=True)) / protos.std((1, 2, 3), keepdim=True)
    g = torch.Generator().manual_seed(seed * 1000 + {"train": 1, "test": 2}[split])
    labels = torch.randint(0, 10, (n,), generator=g)
    shifts = torch.randint(-4, 5, (n, 2), generator=g)
    images = protos[labels]
    for dy in range(-4, 5):  # 81 shift groups, vectorized within each
        for dx in range(-4, 5):
            sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            images[sel] = torch.roll(images[sel], shifts=(dy, dx), dims=(2, 3))
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
    images = images * contrast + 3.0 * torch.randn(images.shape, generator=g)
    return (128 + 25 * images).clamp(0, 255).to(torch.uint8), labels


def load_cifar10(data_dir, train, download):
    """torchvision's CIFAR-10 as (uint8 [N, 3, 32, 32], int64 [N]); it checks the files' md5 sums."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(data_dir, train=train, download=download)
    except Exception as e:  # noqa: BLE001 - offline (URLError), corrupt or missing files: all user-facing
        raise UsageError(
            f"CIFAR-10 is not in {data_dir} (or is corrupted) and could not be downloaded ({str(e).splitlines()[0][:120]}). "
            f"Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into "
            f"{data_dir} (giving {os.path.join(data_dir, 'cifar-10-batches-py')}), or run with --dataset synthetic."
        ) from None
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.long)


class ImageFiles(torch.utils.data.Dataset):
    """Decodes image files to uint8 [3, 32, 32] (RGB; other sizes resized), for loader workers: (image, ok)."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from torchvision.io import ImageReadMode, decode_image, read_file

        try:  # torchvision's decoders (JPEG, PNG, GIF, WebP); PIL for the other formats
            img = decode_image(read_file(self.paths[i]), mode=ImageReadMode.RGB)
        except RuntimeError:
            from PIL import Image

            try:
                with Image.open(self.paths[i]) as im:
                    img = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
                    img = img.view(im.size[1], im.size[0], 3).permute(2, 0, 1)
            except OSError:  # PIL.UnidentifiedImageError is an OSError
                return torch.zeros(3, 32, 32, dtype=torch.uint8), False
        if img.shape[1:] != (32, 32):
            img = F.interpolate(img[None].float(), size=(32, 32), mode="bilinear", antialias=True)[0]
            img = img.round().clamp(0, 255).to(torch.uint8)
        return img, True


def load_imagefolder(root, say):
    """root/train/<class>/* and root/test/<class>/*, same class folders in both (sorted names = labels).
    Decoded once into uint8 tensors by one set of loader worker processes for both splits (decoding is
    CPU-bound, one image at a time)."""
    from torchvision.io import decode_image  # noqa: F401 - imported here once, not again in every worker

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # the node's ranks all decode
    splits = {}
    for split in ("train", "test"):
        d = os.path.join(root, split)
        if not os.path.isdir(d):
            raise UsageError(f"--dataset imagefolder: {d} is missing; expected {root}/{{train,test}}/<class>/<image>")
        classes = sorted(c for c in os.listdir(d) if os.path.isdir(os.path.join(d, c)))
        files = [(os.path.join(d, c, f), label) for label, c in enumerate(classes)
                 for f in sorted(os.listdir(os.path.join(d, c))) if not f.startswith(".")]
        empty = [c for label, c in enumerate(classes) if not any(lab == label for _, lab in files)]
        if not classes or empty:
            raise UsageError(f"--dataset imagefolder: no images in {os.path.join(d, empty[0]) if empty else d}")
        say(f"Loading    : {len(files):,} {split} images from {d}")
        splits[split] = files, classes
    (train, classes), (test, test_classes) = splits["train"], splits["test"]
    if classes != test_classes:
        raise UsageError(f"--dataset imagefolder: class folders differ between train/ ({', '.join(classes)}) "
                         f"and test/ ({', '.join(test_classes)})")
    paths = [path for path, _ in train + test]
    loader = torch.utils.data.DataLoader(ImageFiles(paths), batch_size=500, num_workers=workers if workers > 1 else 0)
    images, ok = (torch.cat(parts) for parts in zip(*loader))
    if not ok.all():
        raise UsageError(f"--dataset imagefolder: cannot read image {paths[int((~ok).nonzero()[0])]}; "
                         f"remove or replace the file")
    labels = torch.tensor([lab for _, lab in train + test], dtype=torch.long)
    n = len(train)
    return (images[:n], labels[:n]), (images[n:], labels[n:]), classes


def load_data(args, is_main, device, say):
    """Returns ((train_x, train_y), (test_x, test_y), class_names): uint8 [N, 3, 32, 32] / int64 CPU tensors."""
    if args.dataset == "synthetic":
        return synthetic_cifar(5_000, args.seed, "train"), synthetic_cifar(1_000, args.seed, "test"), CLASSES
    if os.path.isfile(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir} is a file; give a directory")
    if args.dataset == "imagefolder":  # every rank reads the files itself; nothing is written
        return load_imagefolder(args.data_dir, say)
    error = None
    if is_main:  # rank 0 downloads first; the others wait, then read the files
        try:
            load_cifar10(args.data_dir, True, download=True), load_cifar10(args.data_dir, False, download=True)
        except UsageError as e:
            error = e
    if not all_agree(error is None, device):
        raise error or UsageError("rank 0 could not load the dataset")
    return load_cifar10(args.data_dir, True, download=False), load_cifar10(args.data_dir, False, download=False), CLASSES


def split_validation(train, n_val, seed):
    """Hold out n_val training images (a seeded random choice, the same on every rank) as validation."""
    x, y = train
    if n_val >= len(y):
        raise UsageError(f"--val-split {n_val} leaves no training images (the training set has {len(y):,})")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 7919))
    return (x[order[n_val:]], y[order[n_val:]]), (x[order[:n_val]], y[order[:n_val]])


class DeviceBatches:
    """Mini-batches from a dataset held in device memory. Each epoch every rank takes a distinct,
    equal-sized shard of one global permutation (seeded by seed and epoch), so all ranks run the same
    number of steps and each sample is seen at most once per epoch. No worker processes, no host copies."""

    def __init__(self, images, labels, batch_size, rank, world, device, shuffle, seed=0):
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.rank, self.world, self.shuffle, self.seed = batch_size, rank, world, shuffle, seed
        n = len(labels)
        self.shard = n // world if shuffle else len(range(rank, n, world))  # training: equal shards
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return math.ceil(self.shard / self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(n)
        idx = order[self.rank::self.world][: self.shard].to(self.images.device)
        for start in range(0, self.shard, self.batch_size):
            sel = idx[start:start + self.batch_size]
            yield self.images[sel], self.labels[sel]


class AugmentedBatches(DeviceBatches):
    """DeviceBatches of uint8 images, turned into normalized float32 on the device. With augment=True each
    batch gets a random 32x32 crop of the image zero-padded by 4 px and a random horizontal flip, drawn
    from a generator seeded by (seed, epoch, rank): no host round trip, and a resumed run redraws the
    same crops."""

    def __init__(self, *args, augment=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.augment = augment
        dev = self.images.device
        self.mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=dev).view(1, 3, 1, 1)
        self.grid = torch.arange(32, device=dev)

    def __iter__(self):
        dev = self.images.device
        g = torch.Generator(device=dev).manual_seed((self.seed * 100_003 + self.epoch) * 1_009 + self.rank)
        for images, labels in super().__iter__():
            x = images.float().div_(255)
            if self.augment:
                b = len(labels)
                padded = F.pad(x, (4, 4, 4, 4))  # zeros, like torchvision's RandomCrop(32, padding=4)
                dy, dx = (torch.randint(0, 9, (2, b, 1), generator=g, device=dev))
                rows, cols = (dy + self.grid)[:, None, :, None], (dx + self.grid)[:, None, None, :]
                x = padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(3, device=dev)[None, :, None, None],
                           rows, cols]
                flip = torch.rand(b, 1, 1, 1, generator=g, device=dev) < 0.5
                x = torch.where(flip, x.flip(3), x)
            yield (x - self.mean) / self.std, labels


def nan_batches():
    """Test hook (tests/test_faults.py): DS_EXAMPLES_NAN_BATCHES="rank:epoch:batch,..." fills those training
    batches (epoch from 1, batch index within the epoch from 0) with NaN on that rank only, to check that a
    non-finite loss on one rank is skipped on every rank. Unset in normal use: an empty set."""
    spec = os.environ.get("DS_EXAMPLES_NAN_BATCHES", "")
    return {tuple(int(v) for v in item.split(":")) for item in spec.split(",") if item.strip()}


# ============================================================================ config
def read_config(path, world):
    """Read and check the DeepSpeed JSON (ds_config.json owns batch, precision, optimizer, scheduler)."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"DeepSpeed config not found: {path} (pass --deepspeed_config PATH)") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    for key in ("optimizer", "scheduler", "zero_optimization", "fp16", "bf16", "torch_autocast"):
        if not isinstance(cfg.get(key, {}), dict) or not isinstance(cfg.get(key, {}).get("params", {}), dict):
            raise UsageError(f"{path}: {key!r} must be a JSON object {{...}} (with \"params\" an object too)")
    opt = cfg.get("optimizer", {}).get("type")
    if opt is None:
        raise UsageError(f'{path}: no "optimizer": {{"type": ..., "params": {{...}}}} section; this script needs one')
    if not (str(opt).lower() in deepspeed.runtime.config.DEEPSPEED_OPTIMIZERS or hasattr(torch.optim, str(opt))):
        raise UsageError(f"{path}: unknown optimizer type {opt!r} (use e.g. Adam, AdamW or SGD)")
    cfg["optimizer"].setdefault("params", {})
    clip = cfg.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise UsageError(f"{path}: gradient_clipping must be a number >= 0 (0: off), got {clip!r}")
    micro = cfg.get("train_micro_batch_size_per_gpu")
    gas = cfg.setdefault("gradient_accumulation_steps", 1)
    if not (isinstance(micro, int) and micro > 0 and isinstance(gas, int) and gas > 0):
        raise UsageError(f"{path}: train_micro_batch_size_per_gpu and gradient_accumulation_steps "
                         f"must be positive integers")
    if "train_batch_size" in cfg and cfg["train_batch_size"] != micro * gas * world:
        raise UsageError(f"{path}: train_batch_size {cfg['train_batch_size']} != micro batch {micro} x "
                         f"accumulation {gas} x {world} ranks; drop train_batch_size to fit any GPU count")
    unknown = sorted(set(cfg) - keys_deepspeed_reads(cfg))
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}: DeepSpeed would ignore them without a "
                         f"word (a typo? see https://www.deepspeed.ai/docs/config-json/)")
    return cfg


def keys_deepspeed_reads(cfg):
    """The top-level keys DeepSpeed's own config parser looks up in cfg, found by letting it parse a dict
    that notes every lookup; the version installed decides what is known, not a list kept here. If the
    parser rejects the config, all keys pass: deepspeed.initialize reports the real problem later."""
    seen = set()

    class Recorder(dict):
        def get(self, key, default=None):
            seen.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def keys(self):  # DeepSpeed also asks `key in cfg.keys()`
            return self

    try:
        deepspeed.runtime.config.DeepSpeedConfig(Recorder(json.loads(json.dumps(cfg))))
    except Exception:  # noqa: BLE001 - any parser error is reported by deepspeed.initialize
        return set(cfg)
    return seen


def finalize_config(cfg, args, steps_per_epoch, on_cpu, say):
    """Apply --dtype and fill in what depends on this run: the scheduler's step counts."""
    gas = cfg["gradient_accumulation_steps"]
    # Precision. DeepSpeed 0.19.8 casts only parameters under its fp16/bf16 sections and leaves BatchNorm's
    # running stats fp32, so backward fails ("Expected running_mean to have type BFloat16"). This model
    # therefore runs mixed precision through torch_autocast: weights, BN and optimizer stay fp32, convs and
    # linears compute in bf16/fp16. fp16 autocast under ZeRO-1/2 clips the still-scaled gradients (updates
    # ~0), so fp16 runs without ZeRO, where DeepSpeed unscales with a torch GradScaler before clipping.
    dtype = args.dtype
    autocast = cfg.pop("torch_autocast", {})
    if dtype == "auto":  # an fp16/bf16 section, or a torch_autocast section (its dtype defaults to fp16)
        dtype = "fp16" if cfg.get("fp16", {}).get("enabled") else "bf16" if cfg.get("bf16", {}).get("enabled") \
            else ("bf16" if "bf" in str(autocast.get("dtype")) else "fp16") if autocast.get("enabled") else "fp32"
    if dtype == "fp16" and on_cpu:
        say("notice: fp16 is not supported on the CPU; training in fp32 instead")
        dtype = "fp32"
    cfg.pop("fp16", None)
    cfg.pop("bf16", None)
    if dtype in ("fp16", "bf16"):
        cfg["torch_autocast"] = {"enabled": True, "dtype": {"fp16": "float16", "bf16": "bfloat16"}[dtype]}
    if dtype == "fp16" and cfg.get("zero_optimization", {}).get("stage", 0) > 0:
        say("notice: fp16 autocast runs without ZeRO (DeepSpeed's GradScaler path; ZeRO would clip scaled grads)")
        cfg["zero_optimization"] = {**cfg["zero_optimization"], "stage": 0}

    # Warmup + cosine over the whole run, in optimizer steps for THIS world size.
    if cfg.get("scheduler", {}).get("type") in ("WarmupCosineLR", "WarmupDecayLR"):
        total = max(1, math.ceil(args.epochs * steps_per_epoch / gas))
        params = cfg["scheduler"].setdefault("params", {})
        params["total_num_steps"] = total
        params["warmup_num_steps"] = max(1, min(total, round(args.warmup_epochs * steps_per_epoch / gas)))
    return cfg, dtype


# ============================================================================ distributed setup
def setup_distributed():
    """Works under deepspeed, torchrun, or plain python (then we fill in the launcher's variables)."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")
    return dist.get_rank(), dist.get_world_size(), device


def release_shm_buffer():
    """DeepSpeed's CPU all-reduce (its shm comm op, on a machine without GPUs) never unlinks the ~66 MB
    shared-memory buffer each rank creates, /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>:
    RAM lost until reboot, per rank and run. Every peer maps it at start-up, so removing the name at exit
    is safe; on GPUs there is no such file."""
    env = os.environ
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR')}_{env.get('MASTER_PORT')}_{env.get('RANK')}"
    try:
        os.remove(os.path.join("/dev/shm", name))
    except OSError:
        pass


def all_agree(ok, device):
    """True only if `ok` holds on every rank, so a failure on one rank stops all of them together."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


def reduce_sum(values, device):
    """Sum a list of floats/0-dim tensors over ranks; one collective, one host read."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(t)
    return t.tolist()


# ============================================================================ evaluation
@torch.no_grad()
def evaluate(engine, batches, in_dtype, device, num_classes, tta_flip=False):
    """Global loss, accuracy (%) and per-class accuracy over the sharded test set; with tta_flip the
    logits are averaged over each image and its mirror image."""
    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, correct
    per_class = torch.zeros(2, num_classes, dtype=torch.float64, device=device)  # correct, total
    for images, labels in batches:
        logits = engine(images.to(in_dtype)).float()
        if tta_flip:
            logits = (logits + engine(images.flip(3).to(in_dtype)).float()) / 2
        hit = logits.argmax(1) == labels
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), hit.sum()])
        per_class[0].index_add_(0, labels, hit.double())
        per_class[1].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    dist.all_reduce(sums)
    dist.all_reduce(per_class)
    engine.train()
    total = per_class[1].sum().item()
    loss, correct = sums.tolist()
    return loss / total, 100.0 * correct / total, (100.0 * per_class[0] / per_class[1].clamp(min=1)).tolist()


# ============================================================================ checkpoint and report
def atomic_write(path, write):
    """Write via a temp file + rename, so a crash never leaves a half-written file under `path`; a failed
    write (disk full, quota) ends the run in one line and leaves the previous file in place."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        raise UsageError(f"cannot write {path}: {str(e).splitlines()[0][:150]} (disk full? free some space "
                         f"or pick another --output-dir)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(engine, ckpt_dir, epoch, state, keep):
    """Every rank calls this (ZeRO writes one optimizer shard per rank). DeepSpeed's own `latest` pointer
    is written by rank 0 in place and without waiting for the other ranks' shards, so we write it after
    DeepSpeed's closing barrier, by rename: a crash or kill mid-save leaves the previous checkpoint in force."""
    tag = f"epoch{epoch:04d}"
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=state, save_latest=False)
    except (OSError, RuntimeError) as e:  # disk full mid-save: `latest` still names the previous epoch
        raise UsageError(f"cannot write checkpoint {os.path.join(ckpt_dir, tag)}: {str(e).splitlines()[0][:150]} "
                         f"(disk full? free some space or pick another --output-dir)") from None
    if dist.get_rank() == 0:  # then point `latest` at it, and keep only the latest and the best epoch
        atomic_write(os.path.join(ckpt_dir, "latest"), lambda tmp: open(tmp, "w").write(tag))
        for old in os.listdir(ckpt_dir):
            if old.startswith("epoch") and old not in (tag, keep):
                shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    return tag


def resume_dir(args):
    d = args.resume or args.output_dir
    ckpt = d if os.path.isfile(os.path.join(d, "latest")) else os.path.join(d, "checkpoints")
    if not os.path.isfile(os.path.join(ckpt, "latest")):
        raise UsageError(f"--resume: no checkpoint in {d} (expected {os.path.join(ckpt, 'latest')})")
    return ckpt


def plot_curves(history, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ep = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(ep, [h["train_loss"] for h in history], label="train loss")
    ax1.plot(ep, [h["test_loss"] for h in history], label="test loss")
    ax2.plot(ep, [h["train_accuracy"] for h in history], label="train accuracy")
    ax2.plot(ep, [h["test_accuracy"] for h in history], label="test accuracy")
    ax1.set(xlabel="epoch", ylabel="cross-entropy")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(EXAMPLE)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return True


def init_wandb(args, config, say):
    if not (args.wandb or os.environ.get("WANDB_API_KEY")):
        return None
    try:
        import wandb

        # Unreachable W&B stalls the start for init_timeout seconds; W&B's own WANDB_INIT_TIMEOUT sets it.
        timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", 60))
        return wandb.init(project="deepspeed-cnn-examples", name=EXAMPLE, config={"ds_config": config, **vars(args)},
                          settings=wandb.Settings(init_timeout=timeout, silent=True))
    except Exception as e:  # noqa: BLE001 - W&B is optional: any failure means "run without it"
        say(f"warning: Weights & Biases disabled ({type(e).__name__}: {str(e).splitlines()[0][:150]})")
        return None


def quality(test_acc):
    for floor, tier, text in ((80, "Excellent", "at least 80% of held-out test images classified correctly"),
                              (70, "Good", "at least 70% of held-out test images classified correctly"),
                              (60, "Fair", "at least 60% of held-out test images classified correctly"),
                              (0, "Poor", "under 60% right: train longer or revisit the learning rate")):
        if test_acc >= floor:
            return tier, text


# ============================================================================ training loop
def main(argv=None):
    start = time.time()
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    is_main = rank == 0

    def say(*a):
        if is_main:
            print(*a, flush=True)

    # ---- config, and files every rank must agree on, checked before any work
    cfg = read_config(args.deepspeed_config, world)
    if not all_agree(_writable(args.output_dir), device):
        raise UsageError(f"cannot write to --output-dir {args.output_dir}; pick a writable directory")
    ckpt_dir = os.path.join(args.output_dir, "checkpoints")
    load_from = resume_dir(args) if args.resume is not None else None
    torch.manual_seed(args.seed)

    # ---- data
    (train_x, train_y), (test_x, test_y), class_names = load_data(args, is_main, device, say)
    val = None
    if args.val_split:
        (train_x, train_y), (val_x, val_y) = split_validation((train_x, train_y), args.val_split, args.seed)
        val = AugmentedBatches(val_x, val_y, 1000, rank, world, device, shuffle=False)
    # The whole dataset sits on the device as uint8 (50,000 CIFAR images: 150 MB); batches are cut,
    # augmented and normalized there.
    train = AugmentedBatches(train_x, train_y, cfg["train_micro_batch_size_per_gpu"], rank, world, device,
                             shuffle=True, seed=args.seed, augment=True)
    test = AugmentedBatches(test_x, test_y, 1000, rank, world, device, shuffle=False)
    cfg, dtype = finalize_config(cfg, args, len(train), device.type == "cpu", say)

    # ---- model and engine
    model = build_model(len(class_names))
    n_params = sum(p.numel() for p in model.parameters())
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # seed 004's init check: a broken init would only show up as NaN losses later
        raise UsageError(f"non-finite initial weights in {', '.join(bad)}; check the model's init code")
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    except (AssertionError, TypeError, ValueError, KeyError) as e:  # the config is user input
        raise UsageError(f"DeepSpeed rejected {args.deepspeed_config}: {str(e).splitlines()[0][:200]}") from None
    in_dtype = next(engine.module.parameters()).dtype  # float32: torch_autocast keeps the weights fp32
    global_batch = engine.train_batch_size()
    # fp16 autocast without ZeRO: DeepSpeed's torch GradScaler skips steps with inf/NaN grads (its scale
    # then halves) but does not count them in engine.skipped_steps, and reports no grad norm.
    scaler = engine.torch_autocast_z0_gradscaler
    # DeepSpeed decides skips itself under ZeRO (fp32 or bf16 autocast) and with the GradScaler; for plain
    # fp32 without ZeRO we check the norm.
    own_skip = not (engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled() or scaler)
    clip = engine.gradient_clipping()
    if own_skip and clip > 0:  # we have the global norm already: clip with it, and DeepSpeed does not clip again.
        # Its fp32 clip_grad_norm_ takes a norm per parameter, an all-reduce and two host-to-device copies
        # every step: 02's batch-32 epoch took 8.8-9.5 s with it, 7.3-8.7 s without (A/B, results/gpu/h100_s4h).
        engine._config.gradient_clipping = 0.0  # what engine.gradient_clipping() reads; there is no setter

    say("=" * 80)
    say(f"DeepSpeed CNN training: {EXAMPLE}")
    say("=" * 80)
    say(f"Dataset    : {args.dataset}, {len(train_y):,} train / {len(test_y):,} test images"
        + (f" / {args.val_split:,} validation (selects the best epoch)" if val else "")
        + f", 3x32x32, {len(class_names)} classes; crop+flip augmentation on the device")
    say(f"Model      : CIFAR10CNNEnhanced, {n_params:,} parameters (conv 3->16->32 + BatchNorm, "
        f"fc 2048->128->{len(class_names)})")
    say(f"Precision  : {dtype}{' (torch autocast, fp32 weights)' if dtype != 'fp32' else ''} | ZeRO stage {engine.zero_optimization_stage()} | gradient clipping "
        f"{clip:g} | device {device.type} | world size {world}")
    say(f"Batch      : {cfg['train_micro_batch_size_per_gpu']} per rank x {engine.gradient_accumulation_steps()} "
        f"accumulation x {world} ranks = {global_batch} global; {len(train)} micro-steps per epoch per rank")
    sched = cfg.get("scheduler", {}).get("params", {})
    say(f"Schedule   : {args.epochs} epochs, {cfg['optimizer']['type']} lr {cfg['optimizer']['params'].get('lr')}, "
        f"warmup {sched.get('warmup_num_steps')} steps then cosine to step {sched.get('total_num_steps')}")
    say(f"Loss       : cross-entropy, label smoothing {args.label_smoothing:g}; test-time flip {args.tta_flip}")
    say(f"Stopping   : patience {args.patience} epochs, min improvement {args.min_improvement:g}"
        + (f", max {args.max_steps} steps" if args.max_steps else ""))
    say(f"Output     : {os.path.abspath(args.output_dir)}")

    # ---- resume
    history, best, patience_used, first_epoch, best_tag, wall_before = [], None, 0, 0, None, 0.0
    best_loss = float("inf")
    if load_from:
        try:
            path, state = engine.load_checkpoint(load_from, load_lr_scheduler_states=True)
        except Exception as e:  # noqa: BLE001 - truncated file, other model, wrong format: all user-facing
            raise UsageError(f"--resume: cannot load checkpoint from {load_from}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:150]}") from None
        if path is None or state.get("example") != EXAMPLE:
            raise UsageError(f"--resume: {load_from} holds no {EXAMPLE} checkpoint")
        history, best, best_loss = state["history"], state["best_selection_accuracy"], state["best_loss"]
        patience_used, first_epoch, best_tag = state["patience_used"], state["epoch"] + 1, state["best_tag"]
        wall_before = state["wall_time_s"]
        say(f"Resumed    : {path}, continuing at epoch {first_epoch + 1}")
    run = init_wandb(args, cfg, say) if is_main else None

    # ---- train
    say("-" * 80)
    consecutive_bad, stopped_early, stop_reason = 0, False, ""
    poisoned = nan_batches()
    # A skipped step must leave the model as it was, but forward has already moved BatchNorm's running
    # statistics with the bad batch: copy them at the start of each accumulation window, put back on a skip.
    stats = [b for b in engine.module.buffers() if b.is_floating_point()]
    saved = [b.clone() for b in stats]
    for epoch in range(first_epoch, args.epochs):
        train.set_epoch(epoch)  # new order every epoch, same on every rank
        t0 = time.time()
        ep_sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss*n, correct, n, norm, norm count
        win_sums, win_t0, skipped = torch.zeros_like(ep_sums), time.time(), 0
        for batch, (images, labels) in enumerate(train):
            if (rank, epoch + 1, batch) in poisoned:
                images = torch.full_like(images, float("nan"))
            if stats and engine.micro_steps % engine.gradient_accumulation_steps() == 0:
                for s, b in zip(saved, stats):
                    s.copy_(b)
            loss, logits = forward_loss(engine, images.to(in_dtype), labels, args)
            engine.backward(loss)
            norm, bad = None, False
            boundary = engine.is_gradient_accumulation_boundary()
            if own_skip and boundary:
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads)  # grads are already all-reduced here
                bad = not torch.isfinite(norm)  # one host read; DeepSpeed does the same on its skip paths
                if bad:
                    engine.zero_grad()
                elif clip > 0:
                    torch.nn.utils.clip_grads_with_norm_(engine.module.parameters(), clip, norm)  # x min(1, clip / (norm + 1e-6))
            if not bad:
                scale = None
                if scaler is not None and boundary:  # host read; GradScaler.step reads its inf flag anyway
                    scale = scaler.get_scale()
                    norm = torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters()
                                                          if p.grad is not None]) / scale  # true, unscaled
                skipped_before = engine.skipped_steps
                engine.step()
                # non-finite grads (a GradScaler then halves its scale), the same on all ranks
                bad = engine.skipped_steps != skipped_before or (scale is not None and scaler.get_scale() < scale)
            if bad:  # skipped on every rank: count it and undo the bad batch's BatchNorm update
                skipped, consecutive_bad = skipped + 1, consecutive_bad + 1
                for b, s in zip(stats, saved):
                    b.copy_(s)
                if consecutive_bad >= args.max_bad_steps:
                    break
                continue
            consecutive_bad = 0
            if boundary and norm is None:
                norm = engine.get_global_grad_norm()  # true global, unscaled norm (ZeRO/bf16/fp16)
            n = labels.numel()
            step_sums = [loss.detach() * n, (logits.argmax(1) == labels).sum(), n,
                         0.0 if norm is None else norm, 0.0 if norm is None else 1.0]
            win_sums += torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in step_sums])
            step = engine.global_steps
            if boundary and step % args.log_interval == 0:
                w_loss, w_correct, w_n, w_norm, w_k = reduce_sum(win_sums, device)
                ips = w_n / max(time.time() - win_t0, 1e-9)
                say(f"  step {step:6d} | epoch {epoch + 1:3d} | loss {w_loss / w_n:.4f} | acc {100 * w_correct / w_n:6.2f}% "
                    f"| grad norm {w_norm / max(w_k, 1):.4f} | lr {engine.get_lr()[0]:.3e} | {ips:,.0f} img/s")
                if run:
                    run.log({"step/loss": w_loss / w_n, "step/accuracy": 100 * w_correct / w_n,
                             "step/grad_norm": w_norm / max(w_k, 1), "step/lr": engine.get_lr()[0]}, step=step)
                ep_sums += win_sums
                win_sums.zero_()
                win_t0 = time.time()
            if args.max_steps and step >= args.max_steps:
                break
        ep_sums += win_sums

        # ---- end of epoch: global numbers, evaluation, early stopping (same decision on every rank)
        e_loss, e_correct, e_n, e_norm, e_k = reduce_sum(ep_sums, device)
        if consecutive_bad >= args.max_bad_steps or e_n == 0:
            stop_reason = (f"{consecutive_bad} non-finite steps in a row (epoch {epoch + 1}, {skipped} skipped); "
                           f"nothing was learned from them")
            break
        # BatchNorm's running statistics drift apart per rank (DeepSpeed, unlike DDP, never syncs buffers):
        # average them, so that every rank evaluates, and the checkpoint holds, one and the same model.
        if stats and world > 1:
            for b in stats:
                dist.all_reduce(b)
                b.div_(world)
        test_loss, test_acc, _ = evaluate(engine, test, in_dtype, device, len(class_names), args.tta_flip)
        row = {"epoch": epoch + 1, "train_loss": e_loss / e_n, "train_accuracy": 100 * e_correct / e_n,
               "test_loss": test_loss, "test_accuracy": test_acc, "lr": engine.get_lr()[0],
               "grad_norm": e_norm / max(e_k, 1), "skipped_steps": skipped, "train_images": int(e_n), "epoch_time_s": time.time() - t0,
               "images_per_s": e_n / max(time.time() - t0, 1e-9)}
        if val:
            row["val_loss"], row["val_accuracy"], _ = evaluate(engine, val, in_dtype, device, len(class_names),
                                                               args.tta_flip)
        sel_name, sel_acc = ("val", row["val_accuracy"]) if val else ("test", test_acc)
        history.append(row)
        improved = row["train_loss"] < best_loss - args.min_improvement
        best_loss, patience_used = (row["train_loss"], 0) if improved else (best_loss, patience_used + 1)
        new_best = best is None or sel_acc > best
        say(f"epoch {epoch + 1:3d}/{args.epochs} | train loss {row['train_loss']:.4f} acc {row['train_accuracy']:6.2f}% "
            + (f"| val acc {sel_acc:6.2f}% " if val else "")
            + f"| test loss {test_loss:.4f} acc {test_acc:6.2f}% | grad norm {row['grad_norm']:.4f} "
            f"| lr {row['lr']:.3e} | skipped {skipped} | {row['epoch_time_s']:.1f}s {row['images_per_s']:,.0f} img/s")
        say(f"    {'new best train loss' if improved else f'no train-loss gain: patience {patience_used}/{args.patience}'}"
            + (f" | new best {sel_name} accuracy {sel_acc:.2f}%" if new_best else ""))
        if len(history) > 5 and history[-6]["train_loss"] - row["train_loss"] < 0.01 * history[-6]["train_loss"]:
            say("    loss plateau: under 1% train-loss gain over the last 5 epochs")
        if run:
            run.log({f"epoch/{k}": v for k, v in row.items()}, step=engine.global_steps)
        if new_best:
            best = sel_acc
            weights = master_weights(engine)  # every rank: a collective under ZeRO
            if is_main:  # plain PyTorch state dict of the best model, loadable without DeepSpeed
                atomic_write(os.path.join(args.output_dir, "model.pt"), lambda tmp: torch.save(weights, tmp))
        stopped_early = patience_used >= args.patience
        state = {"example": EXAMPLE, "epoch": epoch, "history": history, "best_selection_accuracy": best,
                 "best_loss": best_loss, "patience_used": patience_used,
                 "best_tag": f"epoch{epoch:04d}" if new_best else best_tag,
                 "wall_time_s": wall_before + time.time() - start, "seed": args.seed}
        best_tag = save_checkpoint(engine, ckpt_dir, epoch, state, keep=state["best_tag"])
        best_tag = state["best_tag"]
        if is_main:
            write_metrics(args, cfg, world, history, None)
        if stopped_early:
            say(f"Early stopping: no train-loss gain above {args.min_improvement:g} for {args.patience} epochs")
            break
        if args.max_steps and engine.global_steps >= args.max_steps:
            say(f"Stopping at --max-steps {args.max_steps}")
            break

    if stop_reason:
        if is_main:
            print(f"error: training diverged: {stop_reason}.", file=sys.stderr)
            print("  check: the data (delete --data-dir and fetch it again), gradient_clipping > 0 in the config, "
                  "a lower learning rate, --dtype fp32 or bf16 instead of fp16, finite initial weights", file=sys.stderr)
        return 3

    # ---- final report
    last = history[-1]
    test_loss, test_acc, per_class = evaluate(engine, test, in_dtype, device, len(class_names), args.tta_flip)
    tier, text = quality(test_acc)
    final = {"test_accuracy": test_acc, "train_accuracy": last["train_accuracy"],
             "best_test_accuracy": max(h["test_accuracy"] for h in history), "selected_on": "val" if val else "test",
             "best_val_accuracy": best if val else None,
             "test_loss": test_loss, "train_loss": last["train_loss"], "quality": tier,
             "epochs_completed": last["epoch"], "stopped_early": stopped_early,
             "wall_time_s": wall_before + time.time() - start, "per_class_accuracy": dict(zip(class_names, per_class)),
             "parameters": n_params, "dtype": dtype, "global_batch_size": global_batch}
    if is_main:
        write_metrics(args, cfg, world, history, final)
        plotted = plot_curves(history, os.path.join(args.output_dir, "curves.png"))
        say("=" * 80)
        say(f"Training finished: {last['epoch']} epochs{' (early stop)' if stopped_early else ''}, "
            f"{final['wall_time_s']:.1f}s wall")
        say(f"  train loss     {history[0]['train_loss']:.4f} -> {last['train_loss']:.4f}")
        say(f"  train accuracy {last['train_accuracy']:.2f}%")
        say(f"  test accuracy  {test_acc:.2f}% (best epoch {final['best_test_accuracy']:.2f}%), test loss {test_loss:.4f}")
        if val:
            say(f"  val accuracy   {history[-1]['val_accuracy']:.2f}% (best epoch {best:.2f}%: model.pt)")
        say("  per class      " + ", ".join(f"{c} {a:.1f}%" for c, a in zip(class_names, per_class)))
        say(f"Quality (held-out test accuracy): {tier}: {text}")
        if args.dataset == "synthetic":
            say("  note: synthetic data (shifted colour prototypes + noise); real CIFAR-10: --dataset cifar10")
        say(f"Saved: {os.path.join(args.output_dir, 'model.pt')}, metrics.json"
            + (", curves.png" if plotted else " (install matplotlib for curves.png)"))
        if run:
            run.summary.update(final)
            run.finish()
    return 0


def write_metrics(args, cfg, world, history, final):
    doc = {"example": EXAMPLE, "world_size": world, "config": cfg,
           "args": {k: v for k, v in vars(args).items() if k != "local_rank"}, "epochs": history, "final": final}
    atomic_write(os.path.join(args.output_dir, "metrics.json"),
                 lambda tmp: open(tmp, "w").write(json.dumps(doc, indent=2)))


def _writable(path):
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
        return True
    except OSError:
        return False


if __name__ == "__main__":
    try:
        code = main()
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        else:  # the launcher kills every rank once one exits: give rank 0 time to print the reason
            time.sleep(3)
        code = 2
    except KeyboardInterrupt:
        code = 130
    if dist.is_initialized():
        if code == 0:  # wait for every rank (rank 0 writes the last files) before tearing down: a rank
            try:  # that exits while a peer is still connected can abort at exit (seen once: SIGABRT, gloo)
                dist.barrier()
            except RuntimeError:  # a peer already gone (it failed, and said why)
                pass
        dist.destroy_process_group()
    release_shm_buffer()
    sys.exit(code)
