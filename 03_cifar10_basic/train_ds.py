"""Example 03: the classic PyTorch-tutorial CNN on CIFAR-10, fed by DeepSpeed's own data loader.

Launch (ds_config.json is found next to this file, whatever the working directory):
  deepspeed --num_gpus=1 train_ds.py --deepspeed --deepspeed_config ds_config.json   # one GPU (or CPU)
  deepspeed --num_gpus=2 train_ds.py --deepspeed --deepspeed_config ds_config.json --epochs 10
  deepspeed --num_gpus=2 train_ds.py --deepspeed_config ds_config_zero2.json          # ZeRO stage 2
  deepspeed --num_gpus=2 train_ds.py --deepspeed_config ds_config_fp16.json           # fp16 + ZeRO-1
  deepspeed --hostfile=hostfile --num_nodes=2 --num_gpus=8 train_ds.py   # two nodes (see README)
  torchrun --nproc_per_node=2 train_ds.py               # torchrun works too
  python train_ds.py                                    # one process, no launcher needed
  python train_ds.py --dataset synthetic                # offline, generated data
  deepspeed --num_gpus=1 train_ds.py --resume           # continue the run in --output-dir
Outputs land in --output-dir (default runs/03_cifar10_basic): checkpoints/ (DeepSpeed, latest and
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
from torch.utils.data import DataLoader, Subset, TensorDataset

EXAMPLE = "03_cifar10_basic"
HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
INPUT_SHAPE = (3, 32, 32)
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# DeepSpeed 0.19.8's ZeRO calls an all_gather that torch >= 2.14 flags as deprecated, once per rank.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
# On a machine without CUDA, building DeepSpeed's CPU comm op logs "No CUDA runtime is found" per rank.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
# DeepSpeed's training loader always asks for pinned memory; on a CPU-only machine torch warns per epoch.
warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true but no accelerator")


class UsageError(Exception):
    """A mistake in flags, files or data: reported in one line, exit code 2, no traceback."""


# ============================================================================ settings
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's multi-line usage dump
        raise UsageError(f"{message} (see --help)")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=2, help="training epochs")
    p.add_argument("--warmup-epochs", type=float, default=1,
                   help="warmup in epochs, for WarmupCosineLR/WarmupDecayLR configs only "
                        "(the shipped WarmupLR takes warmup_num_steps from the config)")
    p.add_argument("--dataset", choices=["cifar10", "imagefolder", "synthetic"], default="cifar10",
                   help="cifar10: torchvision CIFAR-10 in --data-dir (downloaded if missing); imagefolder: "
                        "--data-dir/{train,test}/<class>/*.png|jpg; synthetic: generated offline from --seed")
    p.add_argument("--synthetic-size", type=int, default=10_000,
                   help="--dataset synthetic: training images (the test set is a fifth of it)")
    p.add_argument("--data-dir", default="./data", help="where datasets are read from / downloaded to")
    p.add_argument("--output-dir", default=f"runs/{EXAMPLE}", help="checkpoints, model.pt, metrics.json")
    p.add_argument("--seed", type=int, default=42, help="seeds init, synthetic data and shuffling")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="override the config's precision; auto keeps it")
    p.add_argument("--patience", type=int, default=15, help="early stopping: epochs without train-loss gain")
    p.add_argument("--min-improvement", type=float, default=1e-5, help="early stopping: smallest loss gain")
    p.add_argument("--max-bad-steps", type=int, default=100,
                   help="stop with a diagnosis after this many non-finite steps in a row")
    p.add_argument("--log-interval", type=int, default=2000, help="optimizer steps between [epoch, step] lines")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue from the latest checkpoint in DIR (default: --output-dir)")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (also on if WANDB_API_KEY is set)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # launcher's
    p = deepspeed.add_config_arguments(p)  # --deepspeed, --deepspeed_config PATH
    args = p.parse_args(argv)
    for name in ("epochs", "patience", "log_interval", "max_bad_steps", "synthetic_size"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.max_steps < 0 or args.warmup_epochs < 0 or args.min_improvement < 0:
        raise UsageError("--max-steps, --warmup-epochs and --min-improvement cannot be negative")
    args.deepspeed_config = args.deepspeed_config or os.path.join(HERE, "ds_config.json")
    return args


# ============================================================================ model
class Net(nn.Module):
    """The PyTorch CIFAR-10 tutorial net: conv(3->6, 5x5) -> pool -> conv(6->16, 5x5) -> pool ->
    fc(400->120) -> fc(120->84) -> fc(84->10). PyTorch's default init, as in the tutorial."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))  # [B, 6, 14, 14]
        x = self.pool(F.relu(self.conv2(x)))  # [B, 16, 5, 5]
        x = F.relu(self.fc1(torch.flatten(x, 1)))  # [B, 120]
        x = F.relu(self.fc2(x))  # [B, 84]
        return self.fc3(x)  # [B, 10] logits


def build_model():
    return Net(num_classes=len(CLASSES))


def forward_loss(model, images, labels, args):
    """Cross-entropy on fp32 logits (the model may run in fp16/bf16). Returns (loss, logits)."""
    logits = model(images).float()
    return F.cross_entropy(logits, labels), logits


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
NORMALIZE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # the tutorial's mean/std: pixels [0, 1] -> [-1, 1]


def synthetic_images(n, seed, split):
    """n images [n, 3, 32, 32] in 10 classes: a fixed smooth colour prototype per class (from seed),
    shifted by up to 3 px, scaled in contrast (0.6-1.4), plus Gaussian noise of std 6 (the prototypes have std 1).
    Calibrated on CPU: a plain Adam loop with this config's settings reaches ~85% test after 2 epochs
    of 2,000 images (at noise std 2 it is solved at once)."""
    proto_gen = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.randn(10, 3, 8, 8, generator=proto_gen), size=32, mode="bilinear")
    protos = (protos - protos.mean((1, 2, 3), keepdim=True)) / protos.std((1, 2, 3), keepdim=True)
    g = torch.Generator().manual_seed(seed * 1000 + {"train": 1, "test": 2}[split])
    labels = torch.randint(0, 10, (n,), generator=g)
    shifts = torch.randint(-3, 4, (n, 2), generator=g)
    images = protos[labels]
    for dy in range(-3, 4):  # 49 shift groups, vectorized within each
        for dx in range(-3, 4):
            sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            images[sel] = torch.roll(images[sel], shifts=(dy, dx), dims=(2, 3))
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
    return images * contrast + 6.0 * torch.randn(images.shape, generator=g), labels


def image_transform():
    from torchvision import transforms

    # The seed's preprocessing, no augmentation: ToTensor ([0, 1]) then Normalize to [-1, 1].
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(*NORMALIZE)])


def load_cifar10(data_dir, train, download):
    from torchvision.datasets import CIFAR10

    try:
        return CIFAR10(data_dir, train=train, download=download, transform=image_transform())
    except (RuntimeError, OSError) as e:
        raise UsageError(
            f"CIFAR-10 is not in {data_dir} (or is corrupted) and could not be downloaded "
            f"({str(e).splitlines()[0][:120]}). Fetch {CIFAR_URL} and unpack it in {data_dir} (giving "
            f"{os.path.join(data_dir, 'cifar-10-batches-py')}), or run with --dataset synthetic."
        ) from None


def load_imagefolder(data_dir, split, check):
    """data_dir/split/<class>/<image>. With check, every file's header is read: a non-image or an image
    that is not 32x32 stops the run here, in one line, instead of in a loader worker mid-epoch."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = os.path.join(data_dir, split)
    try:
        ds = ImageFolder(root, transform=image_transform())
    except OSError as e:  # missing folder, no class folders, a class folder without images
        raise UsageError(f"--dataset imagefolder: {root}: {str(e).splitlines()[0][:150]} (expected "
                         f"{data_dir}/train/<class>/*.png and {data_dir}/test/<class>/*.png)") from None
    for path, _ in ds.samples if check else ():
        try:
            with Image.open(path) as im:
                size = im.size
        except OSError as e:  # PIL.UnidentifiedImageError is an OSError
            raise UsageError(f"--dataset imagefolder: {path} is not a readable image ({type(e).__name__})") from None
        if size != INPUT_SHAPE[1:]:
            raise UsageError(f"--dataset imagefolder: {path} is {size[0]}x{size[1]}; the Net takes 32x32 images")
    return ds


def load_data(args, is_main, device):
    """Returns (train dataset, test dataset, class names); items are (float [3, 32, 32], int64 label)."""
    if args.dataset == "synthetic":
        n = args.synthetic_size
        train, test = synthetic_images(n, args.seed, "train"), synthetic_images(max(10, n // 5), args.seed, "test")
        return TensorDataset(*train), TensorDataset(*test), CLASSES
    if os.path.isfile(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir} is a file; give a directory")

    def load(train, first):  # first: download (cifar10) / check every file (imagefolder)
        if args.dataset == "cifar10":
            return load_cifar10(args.data_dir, train, download=first)
        return load_imagefolder(args.data_dir, "train" if train else "test", check=first)

    error, sets = None, None
    if is_main:  # rank 0 downloads first; the others wait, then read the files
        try:
            sets = load(True, True), load(False, True)
        except UsageError as e:
            error = e
    if not all_agree(error is None, device):
        raise error or UsageError("rank 0 could not load the dataset")
    trainset, testset = sets or (load(True, False), load(False, False))
    classes = trainset.classes
    if testset.classes != classes or len(classes) > len(CLASSES):
        raise UsageError(f"{args.data_dir}: train classes {classes} and test classes {testset.classes} must "
                         f"be the same, at most {len(CLASSES)}")
    return trainset, testset, classes


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
    path, gas = args.deepspeed_config, cfg["gradient_accumulation_steps"]
    # Precision. DeepSpeed 0.19.8 traps: fp16 without ZeRO under-scales updates (keep ZeRO >= 1 with
    # fp16), and the CPU accelerator has no fp16 kernels for training.
    dtype = args.dtype
    if dtype == "auto":
        dtype = "fp16" if cfg.get("fp16", {}).get("enabled") else "bf16" if cfg.get("bf16", {}).get("enabled") \
            else "fp32"
    if dtype == "fp16" and on_cpu:
        say("notice: fp16 is not supported on the CPU; training in fp32 instead")
        dtype = "fp32"
    fp16_section = cfg.pop("fp16", {})
    cfg.pop("bf16", None)
    if dtype == "fp16":
        cfg["fp16"] = {**fp16_section, "enabled": True}
        if cfg.get("zero_optimization", {}).get("stage", 0) < 1:
            raise UsageError(f"{path}: fp16 needs zero_optimization.stage >= 1 in DeepSpeed 0.19.x "
                             f"(without ZeRO its loss scaling shrinks every update); or use --dtype bf16")
    elif dtype == "bf16":
        cfg["bf16"] = {"enabled": True, "check_grad_overflow": True}  # skip non-finite steps, as fp16 does

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
def evaluate(engine, batches, in_dtype, device, num_classes):
    """Global loss, accuracy (%) and per-class accuracy over the sharded test set."""
    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, correct
    per_class = torch.zeros(2, num_classes, dtype=torch.float64, device=device)  # correct, total
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = engine(images.to(in_dtype)).float()
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
    for floor, tier, text in ((90, "Excellent", "at least 90% of held-out test images classified correctly"),
                              (70, "Good", "at least 70% of held-out test images classified correctly"),
                              (50, "Fair", "at least half of held-out test images classified correctly"),
                              (0, "Poor", "under half right: train longer or revisit the learning rate")):
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
    trainset, testset, classes = load_data(args, is_main, device)
    # DeepSpeed's sampler pads every rank's shard to ceil(n / world) samples (drop_last off by default).
    shard = math.ceil(len(trainset) / world)
    micro = cfg["train_micro_batch_size_per_gpu"]
    steps_per_epoch = shard // micro if cfg.get("dataloader_drop_last") else math.ceil(shard / micro)
    # Test set: rank r takes samples r, r + world, ... (no padding, so no sample counts twice).
    test = DataLoader(Subset(testset, range(rank, len(testset), world)), batch_size=500, num_workers=2,
                      persistent_workers=True)
    cfg, dtype = finalize_config(cfg, args, steps_per_epoch, device.type == "cpu", say)

    # ---- model and engine
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    try:
        # training_data=: DeepSpeed builds the training loader itself: a DistributedSampler (a distinct
        # shuffled shard per rank), micro-batches of train_micro_batch_size_per_gpu, 2 workers.
        engine, _, trainloader, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                         config=cfg, training_data=trainset)
    except (AssertionError, TypeError, ValueError, KeyError) as e:  # the config is user input
        raise UsageError(f"DeepSpeed rejected {args.deepspeed_config}: {str(e).splitlines()[0][:200]}") from None
    trainloader.data_sampler.seed = args.seed  # DeepSpeed creates the sampler with seed 0; --seed owns it
    in_dtype = next(engine.module.parameters()).dtype  # fp16/bf16 engines hold half-precision weights
    global_batch = engine.train_batch_size()
    # DeepSpeed decides skips itself under ZeRO and fp16/bf16; for plain fp32 we check the norm.
    own_skip = not (engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled())
    clip = engine.gradient_clipping()
    if own_skip and clip > 0:  # we have the global norm already: clip with it, and DeepSpeed does not clip again.
        # Its fp32 clip_grad_norm_ takes a norm per parameter, an all-reduce and two host-to-device copies
        # every step: 02's batch-32 epoch took 8.8-9.5 s with it, 7.3-8.7 s without (A/B, results/gpu/h100_s4h).
        engine._config.gradient_clipping = 0.0  # what engine.gradient_clipping() reads; there is no setter

    say("=" * 80)
    say(f"DeepSpeed CNN training: {EXAMPLE}")
    say("=" * 80)
    say(f"Dataset    : {args.dataset}, {len(trainset):,} train / {len(testset):,} test images, 3x32x32, "
        f"{len(classes)} classes, normalized to [-1, 1], no augmentation")
    say(f"Model      : Net, {n_params:,} parameters (conv 3->6->16, fc 400->120->84->10)")
    say(f"Precision  : {dtype} | ZeRO stage {engine.zero_optimization_stage()} | gradient clipping "
        f"{clip:g} | device {device.type} | world size {world}")
    say(f"Batch      : {cfg['train_micro_batch_size_per_gpu']} per rank x {engine.gradient_accumulation_steps()} "
        f"accumulation x {world} ranks = {global_batch} global; {len(trainloader)} micro-steps per epoch per rank")
    sched = cfg.get("scheduler", {})
    say(f"Schedule   : {args.epochs} epochs, {cfg['optimizer']['type']} lr {cfg['optimizer']['params'].get('lr')}, "
        f"{sched.get('type', 'constant LR')} {json.dumps(sched.get('params', {}))} (steps = optimizer steps)")
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
        history, best, best_loss = state["history"], state["best_test_accuracy"], state["best_loss"]
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
        # DeepSpeed never calls set_epoch on its sampler: without this, every epoch repeats epoch 0's order.
        trainloader.data_sampler.set_epoch(epoch)
        t0, step0 = time.time(), engine.global_steps
        ep_sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss*n, correct, n, norm, norm count
        win_sums, win_t0, skipped = torch.zeros_like(ep_sums), time.time(), 0
        for batch, (images, labels) in enumerate(trainloader):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
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
                skipped_before = engine.skipped_steps
                engine.step()
                bad = engine.skipped_steps != skipped_before  # non-finite grads/fp16 overflow, same on all ranks
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
            if boundary and (step - step0) % args.log_interval == 0:  # the seed's [epoch, step in epoch] line
                w_loss, w_correct, w_n, w_norm, w_k = reduce_sum(win_sums, device)
                ips = w_n / max(time.time() - win_t0, 1e-9)
                say(f"[{epoch + 1}, {step - step0:5d}] loss: {w_loss / w_n:.3f} | acc {100 * w_correct / w_n:6.2f}% "
                    f"| grad norm {w_norm / max(w_k, 1):.4f} | lr {engine.get_lr()[0]:.3e} | step {step} "
                    f"| {ips:,.0f} img/s")
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
        test_loss, test_acc, _ = evaluate(engine, test, in_dtype, device, len(classes))
        row = {"epoch": epoch + 1, "train_loss": e_loss / e_n, "train_accuracy": 100 * e_correct / e_n,
               "test_loss": test_loss, "test_accuracy": test_acc, "lr": engine.get_lr()[0],
               "grad_norm": e_norm / max(e_k, 1), "skipped_steps": skipped, "train_images": int(e_n), "epoch_time_s": time.time() - t0,
               "images_per_s": e_n / max(time.time() - t0, 1e-9)}
        history.append(row)
        improved = row["train_loss"] < best_loss - args.min_improvement
        best_loss, patience_used = (row["train_loss"], 0) if improved else (best_loss, patience_used + 1)
        new_best = best is None or test_acc > best
        say(f"epoch {epoch + 1:3d}/{args.epochs} | train loss {row['train_loss']:.4f} acc {row['train_accuracy']:6.2f}% "
            f"| test loss {test_loss:.4f} acc {test_acc:6.2f}% | grad norm {row['grad_norm']:.4f} "
            f"| lr {row['lr']:.3e} | skipped {skipped} | {row['epoch_time_s']:.1f}s {row['images_per_s']:,.0f} img/s")
        say(f"    {'new best train loss' if improved else f'no train-loss gain: patience {patience_used}/{args.patience}'}"
            + (f" | new best test accuracy {test_acc:.2f}%" if new_best else ""))
        if len(history) > 5 and history[-6]["train_loss"] - row["train_loss"] < 0.01 * history[-6]["train_loss"]:
            say("    loss plateau: under 1% train-loss gain over the last 5 epochs")
        if run:
            run.log({f"epoch/{k}": v for k, v in row.items()}, step=engine.global_steps)
        if new_best:
            best = test_acc
            weights = master_weights(engine)  # every rank: a collective under ZeRO
            if is_main:  # plain PyTorch state dict of the best model, loadable without DeepSpeed
                atomic_write(os.path.join(args.output_dir, "model.pt"), lambda tmp: torch.save(weights, tmp))
        stopped_early = patience_used >= args.patience
        state = {"example": EXAMPLE, "epoch": epoch, "history": history, "best_test_accuracy": best,
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
            print("  check: input data for NaN/Inf, a lower learning rate, gradient_clipping in the config, "
                  "--dtype fp32 / bf16 instead of fp16", file=sys.stderr)
        return 3

    # ---- final report
    last = history[-1]
    test_loss, test_acc, per_class = evaluate(engine, test, in_dtype, device, len(classes))
    tier, text = quality(test_acc)
    final = {"test_accuracy": test_acc, "train_accuracy": last["train_accuracy"], "best_test_accuracy": best,
             "test_loss": test_loss, "train_loss": last["train_loss"], "quality": tier,
             "epochs_completed": last["epoch"], "stopped_early": stopped_early,
             "wall_time_s": wall_before + time.time() - start, "per_class_accuracy": dict(zip(classes, per_class)),
             "classes": list(classes),
             "parameters": n_params, "dtype": dtype, "global_batch_size": global_batch}
    if is_main:
        write_metrics(args, cfg, world, history, final)
        plotted = plot_curves(history, os.path.join(args.output_dir, "curves.png"))
        say("=" * 80)
        say(f"Training finished: {last['epoch']} epochs{' (early stop)' if stopped_early else ''}, "
            f"{final['wall_time_s']:.1f}s wall")
        say(f"  train loss     {history[0]['train_loss']:.4f} -> {last['train_loss']:.4f}")
        say(f"  train accuracy {last['train_accuracy']:.2f}%")
        say(f"  test accuracy  {test_acc:.2f}% (best epoch {best:.2f}%), test loss {test_loss:.4f}")
        say(f"Quality (held-out test accuracy): {tier}: {text}")
        for name, acc in zip(classes, per_class):
            say(f"  accuracy of {name:10s}: {acc:6.2f}%")
        if args.dataset == "synthetic":
            say("  note: synthetic data (shifted class prototypes + noise); real CIFAR-10: --dataset cifar10")
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
