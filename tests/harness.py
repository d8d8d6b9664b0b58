"""Shared test harness: run an example for real (the `deepspeed` launcher, torchrun or plain python,
CPU/gloo) on small generated data and read back what it left behind; or call its functions in this
process. Point it at any example folder by name."""

import contextlib
import functools
import gzip
import importlib.util
import io
import json
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running pytest also holds `deepspeed` and `torchrun`
EXAMPLES = ["01_basic_convnet", "02_cifar10", "03_cifar10_basic"]
PORTS = []  # master ports of this session's runs: conftest.py removes their shm buffers
STARTS = []  # (launcher, ranks, runs) of every launch: conftest.py prints the count


def script(example):
    return REPO / example / "train_ds.py"


@functools.cache
def load_example(example):
    """`example`'s train_ds.py as a module (the folders are not packages), imported once."""
    spec = importlib.util.spec_from_file_location(f"ex_{example}", script(example))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # so that its functions pickle by name (data-loader processes)
    spec.loader.exec_module(mod)
    return mod


def built_once(build, tmp_path_factory):
    """get(example) -> build(example, a fresh tmp dir), built on first use and kept: a module
    fixture returns it so that each example's launches run once, whichever test asks first."""
    built = {}

    def get(example):
        if example not in built:
            built[example] = build(example, tmp_path_factory.mktemp(example[:2]))
        return built[example]

    return get


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        PORTS.append(s.getsockname()[1])
        return PORTS[-1]


def offline_env():
    """Environment for a run: no GPU, no W&B, and any download attempt fails at once (dead proxy)."""
    drop = ("WANDB", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_", "CUDA_VISIBLE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    dead = "http://127.0.0.1:9"
    env.update(http_proxy=dead, https_proxy=dead, HTTP_PROXY=dead, HTTPS_PROXY=dead, no_proxy="",
               NO_PROXY="", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    output_dir: Path

    def metrics(self, output_dir=None):
        return json.loads((Path(output_dir or self.output_dir) / "metrics.json").read_text())

    @property
    def text(self):
        return self.stdout + self.stderr

    def part(self, k):
        """stdout, stderr and exit code of run k of a tests/drive.py sequence."""
        def cut(text):
            pieces = re.split(r"^@@ run \d+ rc -?\d+ \([\d.]+ s\)\n", text, flags=re.M)
            return pieces[k] if k < len(pieces) else ""
        found = re.search(rf"^@@ run {k} rc (-?\d+) ", self.stdout, re.M)
        assert found, f"run {k} never finished\n{self}"
        return Run(int(found.group(1)), cut(self.stdout), cut(self.stderr), self.output_dir)

    def __str__(self):  # shown by pytest when an assertion about a Run fails
        return f"rc={self.rc}\n--- stdout (tail)\n{self.stdout[-4000:]}\n--- stderr (tail)\n{self.stderr[-4000:]}"


def launch(example, args=(), *, output_dir=None, ranks=1, launcher="deepspeed", runs=None, drive=(),
           env=None, cwd=None, timeout=300, stall=None, fsize=None, on_line=None, hang_hint="",
           linger=10):
    """Run `example`'s train_ds.py (launcher: deepspeed | torchrun | python | main.py, 03's launcher). With `runs` (a list of
    argument lists) tests/drive.py runs them one after another in the same ranks, with `drive`'s
    fault options. The process group is killed whole after `timeout` seconds, or after `stall`
    seconds without output: a rank left waiting in a collective fails the test (with `hang_hint`)
    instead of hanging it. on_line(line, process) sees each output line as it comes. After the
    launcher exits, its output is read for up to `linger` seconds more, until every process that
    holds it (its child, the ranks) is gone."""
    args = [str(a) for a in args]
    if output_dir is not None and "--output-dir" not in args:
        args += ["--output-dir", str(output_dir)]
    target = [str(script(example)), *args]
    if runs is not None:
        target = [str(REPO / "tests" / "drive.py"), example, *map(str, drive)]
        for r in runs:
            target += ["::", *map(str, r)]
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), f"--num_gpus={ranks}", f"--master_port={free_port()}", *target]
    elif launcher == "main.py":
        cmd = [sys.executable, str(REPO / example / "main.py"), "--num_gpus", str(ranks), "--master_port",
               str(free_port()), "--", *args]
    elif launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), f"--nproc_per_node={ranks}", f"--master_port={free_port()}",
               *target]
    else:
        assert ranks == 1, "plain python runs one process"
        cmd = [sys.executable, *target]

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    STARTS.append((launcher, ranks, len(runs) if runs is not None else 1))
    p = subprocess.Popen(cmd, cwd=cwd or (Path(output_dir).parent if output_dir else REPO),
                         env={**offline_env(), **(env or {})}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=limit if fsize else None)
    streams, last = {"out": [], "err": []}, [time.time()]

    def read(pipe, into):
        for line in pipe:
            into.append(line)
            last[0] = time.time()
            if on_line:
                on_line(line, p)

    readers = [threading.Thread(target=read, args=(pipe, streams[k]), daemon=True)
               for pipe, k in ((p.stdout, "out"), (p.stderr, "err"))]
    for r in readers:
        r.start()
    start, why = time.time(), None
    while p.poll() is None:
        now = time.time()
        if now - start > timeout or (stall and now - last[0] > stall):
            why = f"no exit within {timeout} s" if now - start > timeout else f"no output for {stall} s"
            os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    p.wait()
    end = time.time() + linger
    for r in readers:
        r.join(timeout=max(0.0, end - time.time()))
    out, err = "".join(streams["out"]), "".join(streams["err"])
    if why:
        pytest.fail(f"{why}{': ' + hang_hint if hang_hint else ''}\n{out[-3000:]}\n{err[-3000:]}")
    return Run(p.returncode, out, err, Path(output_dir) if output_dir else None)


class ReachedDeepSpeed(Exception):
    """Raised in place of setup_distributed by in_process(): the input passed every check."""


def in_process(example, argv):
    """Run the script's run(argv) here, stopping where DeepSpeed would start: (exit code, stdout,
    stderr). For input that must be refused before anything slow starts."""
    mod = load_example(example)
    out, err = io.StringIO(), io.StringIO()
    real, handler = mod.setup_distributed, signal.getsignal(signal.SIGTERM)

    def stop():
        raise ReachedDeepSpeed(f"{example}: {argv} passed every check and would start DeepSpeed")

    mod.setup_distributed = stop
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = mod.run([str(a) for a in argv])
    finally:
        mod.setup_distributed = real
        signal.signal(signal.SIGTERM, handler)
    return rc, out.getvalue(), err.getvalue()


def assert_clean_error(rc, stderr, *needles):
    """The contract's bad-input rule: non-zero exit, one or two lines on stderr, no traceback, and the
    message names the problem (every needle appears, case-insensitive)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]
    assert rc not in (0, None), (rc, stderr)
    assert 1 <= len(lines) <= 2 and "Traceback" not in stderr, stderr
    for n in needles:
        assert n.lower() in stderr.lower(), (n, stderr)


def write_config(example, path, edit=None, name="ds_config.json"):
    """A copy of the example's config at `path`, changed by edit(cfg) -> None."""
    cfg = json.loads((REPO / example / name).read_text())
    if edit:
        edit(cfg)
    Path(path).write_text(json.dumps(cfg))
    return Path(path)


def micro(n, **more):
    """edit for write_config: this micro batch (and any other top-level keys)."""
    return lambda c: c.update(train_micro_batch_size_per_gpu=n, **more)


@contextlib.contextmanager
def gloo(world=1):
    """A one-process gloo group for calling the scripts' collective functions in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- generated datasets
def learnable_images(n, size, channels, classes, seed):
    """uint8 images [n, size, size, channels] whose class is visible: a bright bar in a class-specific
    place (and a class-specific tint) on noise. Labels are balanced."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    imgs = torch.randint(0, 90, (n, size, size, channels), generator=g, dtype=torch.int32)
    band = max(1, size // classes)
    for c in range(classes):
        sel = labels == c
        imgs[sel, (c * band) % size:(c * band) % size + band, :, :] += 150
        if channels == 3:
            imgs[sel, :, :, c % 3] += 30
    return imgs.clamp(0, 255).to(torch.uint8), labels


def make_mnist_idx(root, n_train=600, n_test=200, seed=0):
    """MNIST-format IDX files in root/MNIST/raw (what torchvision.datasets.MNIST reads)."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        imgs, labels = learnable_images(n, 28, 1, 10, s)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + imgs.squeeze(-1).numpy().tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.to(torch.uint8).numpy().tobytes())
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
    """The official CIFAR-10 python layout (cifar-10-batches-py/data_batch_1..5, test_batch,
    batches.meta) with str keys, as torchvision reads the official Python 2 pickles; learnable.
    torchvision checks the real files' md5: tests patch that check."""
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    imgs, labels = learnable_images(n_train, 32, 3, 10, seed)
    per = n_train // 5
    for b in range(5):
        sl = slice(b * per, (b + 1) * per)
        with open(d / f"data_batch_{b + 1}", "wb") as f:
            pickle.dump({"data": imgs[sl].permute(0, 3, 1, 2).reshape(-1, 3072).numpy(),
                         "labels": labels[sl].tolist()}, f)
    timgs, tlabels = learnable_images(n_test, 32, 3, 10, seed + 1)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": timgs.permute(0, 3, 1, 2).reshape(-1, 3072).numpy(),
                     "labels": tlabels.tolist()}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return Path(root)


def gzip_file(path):
    with open(path, "rb") as fi, gzip.open(f"{path}.gz", "wb") as fo:
        shutil.copyfileobj(fi, fo)
