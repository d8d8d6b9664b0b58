"""Shared test harness: run an example for real (deepspeed launcher, torchrun or plain python, CPU/gloo)
on small generated data, and read back what it left behind. Point it at any example folder by name."""

import gzip
import importlib.util
import json
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running pytest also holds `deepspeed` and `torchrun`
EXAMPLES = ["01_basic_convnet", "02_cifar10", "03_cifar10_basic"]


def script(example):
    return REPO / example / "train_ds.py"


def load_example(example):
    """Import `example`'s train_ds.py as a module (the folders are not packages), for in-process checks."""
    spec = importlib.util.spec_from_file_location(f"ex_{example}", script(example))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    output_dir: Path

    @property
    def metrics(self):
        return json.loads((self.output_dir / "metrics.json").read_text())

    @property
    def text(self):
        return self.stdout + self.stderr

    def __str__(self):  # shown by pytest when an assertion on a Run fails
        return f"rc={self.rc}\n--- stdout (tail)\n{self.stdout[-4000:]}\n--- stderr (tail)\n{self.stderr[-4000:]}"


def offline_env():
    """Environment for a run: no GPU, no W&B, and any download attempt fails at once (dead proxy)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                     "MASTER_", "CUDA_VISIBLE"))}
    dead = "http://127.0.0.1:9"
    env.update(http_proxy=dead, https_proxy=dead, HTTP_PROXY=dead, HTTPS_PROXY=dead, no_proxy="", NO_PROXY="",
               PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def run_example(example, args=(), *, output_dir, ranks=1, launcher="deepspeed", cwd=None, env=None, timeout=900):
    """Run `example`'s train_ds.py with `args` and return a Run. launcher: deepspeed | torchrun | python."""
    output_dir = Path(output_dir)
    args = [str(a) for a in args]
    if "--output-dir" not in args:
        args += ["--output-dir", str(output_dir)]
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), f"--num_gpus={ranks}", f"--master_port={free_port()}", str(script(example))]
    elif launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), f"--nproc_per_node={ranks}", f"--master_port={free_port()}",
               str(script(example))]
    else:
        assert ranks == 1, "plain python runs one process"
        cmd = [sys.executable, str(script(example))]
    e = offline_env()
    e.update(env or {})
    # Own session: on timeout the launcher AND its ranks are killed (a surviving rank holding the pipes
    # would keep communicate() waiting past the timeout), and the test fails instead of hanging.
    p = subprocess.Popen(cmd + args, cwd=cwd or output_dir.parent, env=e, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return Run(p.returncode, out, err, output_dir)


# The contract's bad-input cases every example must reject in one or two lines (tests/test_0N_* run them
# with the example's own extra cases; tests/test_faults.py adds the wider battery).
CONTRACT_BAD_INPUT = ["malformed", "missing", "optimizer", "epochs0", "resume_empty", "unwritable"]


def contract_bad_input(example, case, tmp_path):
    """(extra args, words the error must contain) for one of CONTRACT_BAD_INPUT."""
    if case == "malformed":
        cfg = tmp_path / "bad.json"
        cfg.write_text('{"train_micro_batch_size_per_gpu": 4,,}')
        return ["--deepspeed_config", cfg], ["not valid JSON"]
    if case == "missing":
        return ["--deepspeed_config", tmp_path / "nope.json"], ["not found"]
    if case == "optimizer":
        cfg = write_config(example, tmp_path / "c.json", lambda c: c["optimizer"].update(type="Adamm"))
        return ["--deepspeed_config", cfg], ["unknown optimizer", "Adamm"]
    if case == "epochs0":
        return ["--epochs", "0"], ["--epochs"]
    if case == "resume_empty":
        (tmp_path / "empty").mkdir()
        return ["--resume", tmp_path / "empty"], ["no checkpoint"]
    assert case == "unwritable", case
    (tmp_path / "file").write_text("x")
    return ["--output-dir", tmp_path / "file" / "out"], ["cannot write"]


def assert_clean_error(run, *needles):
    """The contract's bad-input rule: non-zero exit, at most two lines on stderr, no traceback,
    and the message names the problem (every needle appears, case-insensitive)."""
    assert run.rc != 0, run
    err = [line for line in run.stderr.splitlines() if line.strip()]
    assert 1 <= len(err) <= 2, run
    assert "Traceback" not in run.text, run
    for n in needles:
        assert n.lower() in run.stderr.lower(), run


def write_config(example, path, edit=None):
    """Copy the example's ds_config.json to `path`, optionally changed by edit(cfg) -> None."""
    cfg = json.loads((REPO / example / "ds_config.json").read_text())
    if edit:
        edit(cfg)
    Path(path).write_text(json.dumps(cfg))
    return Path(path)


# ----------------------------------------------------------------------------- generated datasets
def learnable_images(n, size, channels, classes, seed):
    """uint8 images [n, size, size, channels] whose class is visible: a per-class colour/brightness
    pattern (a bright bar in a class-specific place) on noise. Labels are balanced."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=g)]
    imgs = torch.randint(0, 90, (n, size, size, channels), generator=g, dtype=torch.int32)
    band = max(1, size // classes)
    for c in range(classes):
        sel = labels == c
        r0 = (c * band) % size
        imgs[sel, r0:r0 + band, :, :] += 150
        if channels == 3:
            imgs[sel, :, :, c % 3] += 30
    return imgs.clamp(0, 255).to(torch.uint8), labels


def make_mnist_idx(root, n_train=600, n_test=200, seed=0):
    """Write MNIST-format IDX files to root/MNIST/raw (what torchvision.datasets.MNIST reads)."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        imgs, labels = learnable_images(n, 28, 1, 10, s)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) +
                                                          imgs.squeeze(-1).numpy().tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) +
                                                          labels.to(torch.uint8).numpy().tobytes())
    return Path(root)


def make_imagefolder(root, classes=("a", "b", "c"), n_train=60, n_test=30, size=32, seed=0):
    """root/train/<class>/*.png and root/test/<class>/*.png, learnable (see learnable_images)."""
    from PIL import Image

    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        imgs, labels = learnable_images(n, size, 3, len(classes), s)
        for i, (img, lab) in enumerate(zip(imgs, labels)):
            d = Path(root) / split / classes[lab]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.numpy()).save(d / f"{i:05d}.png")
    return Path(root)


def make_cifar_pickles(root, n_train=500, n_test=100, seed=0):
    """The official CIFAR-10 python layout (root/cifar-10-batches-py/data_batch_1..5, test_batch,
    batches.meta), learnable. torchvision checks the real files' md5: tests patch that check."""
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    imgs, labels = learnable_images(n_train, 32, 3, 10, seed)
    per = n_train // 5
    for b in range(5):
        sl = slice(b * per, (b + 1) * per)
        data = imgs[sl].permute(0, 3, 1, 2).reshape(-1, 3072).numpy()
        with open(d / f"data_batch_{b + 1}", "wb") as f:
            pickle.dump({b"data": data, b"labels": labels[sl].tolist()}, f)
    timgs, tlabels = learnable_images(n_test, 32, 3, 10, seed + 1)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": timgs.permute(0, 3, 1, 2).reshape(-1, 3072).numpy(), b"labels": tlabels.tolist()}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names]}, f)
    return Path(root)


def gzip_file(path):
    with open(path, "rb") as fi, gzip.open(f"{path}.gz", "wb") as fo:
        shutil.copyfileobj(fi, fo)
