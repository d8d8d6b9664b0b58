"""Fault battery, the same cases for all three examples, run for real on the CPU through the `deepspeed`
launcher: kill -9 of every rank and --resume, rank agreement (early stop, a non-finite loss on one rank,
divergence), bad input (config, flags, data, checkpoints, disk full, W&B) and offline data.

Runs are small (a few hundred images, 1-4 epochs). Every test has a pytest timeout, and every run is
started in its own process group that is killed whole if it outlives its own timeout, so a rank left
waiting in a collective fails the test instead of hanging the suite."""

import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from harness import (
    BIN,
    EXAMPLES,
    Run,
    assert_clean_error,
    free_port,
    make_cifar_pickles,
    make_imagefolder,
    make_mnist_idx,
    offline_env,
    script,
    write_config,
)

# A private cache for DeepSpeed's JIT-built CPU comm op: other checkouts building it with other flags
# would otherwise make every run here rebuild it (60+ s on a small machine).
ENV = {"TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "torch_extensions_faults")}
TIMING = {"epoch_time_s", "images_per_s", "wall_time_s"}  # the only values two equal runs may differ in
CHEAP = {"01_basic_convnet": [], "02_cifar10": ["--dataset", "synthetic"],
         "03_cifar10_basic": ["--dataset", "synthetic", "--synthetic-size", "400"]}


def launch(example, args, out, *, ranks=1, env=None, timeout=240, fsize=None):
    """Run train_ds.py under the deepspeed launcher, like harness.run_example, but in a new process group
    that is SIGKILLed whole on timeout (subprocess.run would kill only the launcher and then wait for the
    ranks, which may never end), and optionally with a file-size limit (fsize bytes: writes past it fail
    with EFBIG, as on a full disk; Python ignores the SIGXFSZ that comes with it)."""
    out = Path(out)
    cmd = [str(BIN / "deepspeed"), f"--num_gpus={ranks}", f"--master_port={free_port()}", str(script(example)),
           *[str(a) for a in args], "--output-dir", str(out)]

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    p = subprocess.Popen(cmd, cwd=out.parent, env={**offline_env(), **ENV, **(env or {})}, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=limit if fsize else None)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        pytest.fail(f"run did not end within {timeout} s (a rank left waiting?)\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return Run(p.returncode, stdout, stderr, out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Per example: flags for a small real-format dataset (01: MNIST IDX files, 02: an ImageFolder with a
    micro batch of 16, 03: synthetic). At 2 ranks: 20, 12 and 50 optimizer steps per epoch."""
    root = tmp_path_factory.mktemp("data")
    cfg02 = write_config("02_cifar10", root / "small02.json", lambda c: c.update(train_micro_batch_size_per_gpu=16))
    return {
        "01_basic_convnet": ["--dataset", "mnist", "--data-dir", make_mnist_idx(root / "mnist", 1280, 100),
                             "--warmup-epochs", "1"],
        "02_cifar10": ["--dataset", "imagefolder", "--data-dir", make_imagefolder(root / "imgs", n_train=384, n_test=48),
                       "--deepspeed_config", cfg02, "--warmup-epochs", "1"],
        "03_cifar10_basic": CHEAP["03_cifar10_basic"],
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per example, lazily: the checkpoints/ folder of a 2-step run (for the --resume cases)."""
    made = {}

    def get(example):
        if example not in made:
            out = tmp_path_factory.mktemp("ckpt") / example
            r = launch(example, CHEAP[example] + ["--epochs", "1", "--max-steps", "2"], out)
            assert r.rc == 0, r
            made[example] = out / "checkpoints"
        return made[example]

    return get


def comparable(metrics):
    """metrics.json's per-epoch rows and final summary, without the timings (all two equal runs may
    differ in)."""
    rows = [{k: v for k, v in e.items() if k not in TIMING} for e in metrics["epochs"]]
    final = {k: v for k, v in (metrics["final"] or {}).items() if k not in TIMING}
    return rows, final


def assert_nothing_half_written(out):
    """No output that looks complete but is not: no metrics.json or model.pt, no temp files, no `latest`
    pointer (with nothing trained, there is nothing to resume)."""
    out = Path(out)
    assert not (out / "metrics.json").exists() and not (out / "model.pt").exists()
    assert not (out / "checkpoints" / "latest").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], list(out.rglob("*"))


# ============================================================================ kill -9 and resume
EVENT = re.compile(r"\bstep\s+\d+\b|^epoch\s+\d+/\d+ \|")  # a step line (01/02 and 03 formats) or an epoch line


def events(lines):
    return [ln for ln in lines if EVENT.search(ln)]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("example", EXAMPLES)
def test_kill_every_rank_then_resume_matches_uninterrupted(example, data, tmp_path):
    """SIGKILL the launcher and both ranks when a randomly chosen line of epoch 2 appears: a step line, or
    the epoch line, which is printed just before model.pt and the checkpoint are written, so the kill may
    land mid-save; the first checkpoint is complete by then. A half-written next checkpoint is added
    beside it. --resume must then finish with exactly the metrics and model.pt of an uninterrupted run.
    Tolerance: none. The CPU runs are deterministic (one thread, data order and augmentation fixed by
    --seed and the epoch, gloo sums in a fixed order) and a resume restores all state (weights, optimizer,
    LR schedule, history; BatchNorm statistics are the same on every rank at each save), so any
    difference means state was lost or an epoch was trained twice. FAULTS_SEED=N repeats a kill point."""
    args = data[example] + ["--epochs", "4", "--log-interval", "1", "--seed", "7"]
    ref = launch(example, args, tmp_path / "ref", ranks=2, timeout=400)
    assert ref.rc == 0, ref
    ev = events(ref.stdout.splitlines())
    first = next(i for i, ln in enumerate(ev) if ln.startswith("epoch   1/"))
    second = next(i for i, ln in enumerate(ev) if ln.startswith("epoch   2/"))
    seed = int(os.environ.get("FAULTS_SEED", random.randrange(10**6)))
    target = random.Random(seed).randint(first + 1, second)  # any event of epoch 2, after checkpoint 1
    why = f"(FAULTS_SEED={seed}: killed at event {target}: {ev[target].strip()[:60]!r})"

    out = tmp_path / "run"
    cmd = [str(BIN / "deepspeed"), "--num_gpus=2", f"--master_port={free_port()}", str(script(example)),
           *[str(a) for a in args], "--output-dir", str(out)]
    p = subprocess.Popen(cmd, cwd=tmp_path, env={**offline_env(), **ENV}, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    seen, log = 0, []
    try:
        for line in p.stdout:  # pytest's timeout ends this loop if the run stalls
            log.append(line)
            if EVENT.search(line):
                if seen == target:
                    os.killpg(p.pid, signal.SIGKILL)  # the launcher and every rank: one process group
                    break
                seen += 1
    finally:
        if p.poll() is None and seen != target:
            os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    assert seen == target and p.returncode == -signal.SIGKILL, f"{why}\n{''.join(log)[-3000:]}"
    for _ in range(100):  # every rank is gone (reparented ranks are reaped by init)
        try:
            os.killpg(p.pid, 0)
            time.sleep(0.1)
        except ProcessLookupError:
            break
    else:
        pytest.fail(f"ranks survived the kill {why}")
    ckpt = out / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    assert tag in ("epoch0000", "epoch0001", "epoch0002"), why  # two epochs of slack for the kill to land
    assert json.loads((out / "metrics.json").read_text())["final"] is None, why  # really interrupted
    # what a kill during the next save leaves: the next tag's folder with a truncated model file
    nxt = ckpt / f"epoch{int(tag[5:]) + 1:04d}"
    if not nxt.exists():
        nxt.mkdir()
        blob = (ckpt / tag / "mp_rank_00_model_states.pt").read_bytes()
        (nxt / "mp_rank_00_model_states.pt").write_bytes(blob[: len(blob) // 2])

    resumed = launch(example, args + ["--resume"], out, ranks=2, timeout=400)
    assert resumed.rc == 0, f"{why}\n{resumed}"
    assert f"continuing at epoch {int(tag[5:]) + 2}" in resumed.stdout, why
    assert comparable(resumed.metrics) == comparable(ref.metrics), why
    wa = torch.load(ref.output_dir / "model.pt", weights_only=True)
    wb = torch.load(out / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), why


# ============================================================================ ranks agree
@pytest.mark.timeout(600)
@pytest.mark.parametrize("example", EXAMPLES)
def test_two_ranks_skip_a_nan_batch_once_and_stop_early_together(example, data, tmp_path):
    """Rank 1 alone gets a NaN batch in epoch 1 (the scripts' DS_EXAMPLES_NAN_BATCHES test hook): the step
    is skipped on both ranks, counted once, and training goes on with finite numbers. Then early stopping
    (no train-loss gain of 1e9 for 1 epoch) ends epoch 2 on both ranks: had one rank gone on alone, it
    would wait forever in a collective and the run would not end."""
    r = launch(example, data[example] + ["--epochs", "4", "--patience", "1", "--min-improvement", "1e9",
                                         "--log-interval", "1"],
               tmp_path / "o", ranks=2, env={"DS_EXAMPLES_NAN_BATCHES": "1:1:2"}, timeout=400)
    assert r.rc == 0, r
    m = r.metrics
    e1, e2 = m["epochs"]
    assert (e1["skipped_steps"], e2["skipped_steps"]) == (1, 0), m["epochs"]
    assert e1["train_images"] < e2["train_images"], m["epochs"]  # the skipped batch is not counted
    for e in m["epochs"]:
        assert all(math.isfinite(e[k]) for k in ("train_loss", "test_loss", "grad_norm")), e
    assert m["final"]["stopped_early"] and m["final"]["epochs_completed"] == 2, m["final"]
    assert math.isfinite(m["final"]["test_loss"]), m["final"]
    assert r.stdout.count("Early stopping:") == 1 and "skipped 1 |" in r.stdout, r
    assert "Traceback" not in r.text, r


@pytest.mark.timeout(600)
@pytest.mark.parametrize("example", EXAMPLES)
def test_two_ranks_stop_with_diagnosis_past_the_non_finite_threshold(example, data, tmp_path):
    """Two NaN batches in a row on rank 1 with --max-bad-steps 2: both ranks stop, rank 0 prints the
    diagnosis, the exit code is not 0 and no result files are left behind."""
    r = launch(example, data[example] + ["--epochs", "2", "--max-bad-steps", "2"], tmp_path / "o", ranks=2,
               env={"DS_EXAMPLES_NAN_BATCHES": "1:1:1,1:1:2"}, timeout=400)
    assert_clean_error(r, "training diverged", "2 non-finite steps in a row", "check:")
    assert not (r.output_dir / "model.pt").exists() and not (r.output_dir / "metrics.json").exists()


# ============================================================================ bad input
def _cfg(example, tmp, edit):
    return ["--deepspeed_config", write_config(example, tmp / "c.json", edit)]


def _text_cfg(tmp, text):
    (tmp / "c.json").write_text(text)
    return ["--deepspeed_config", tmp / "c.json"]


def _data_dir_file(example, tmp):
    (tmp / "file").write_text("x")
    return ["--dataset", "mnist" if example == "01_basic_convnet" else "cifar10", "--data-dir", tmp / "file"]


def _corrupt_dataset(example, tmp):
    if example == "01_basic_convnet":  # complete-looking files, cut short (an interrupted extraction)
        raw = make_mnist_idx(tmp / "data", 64, 32) / "MNIST" / "raw"
        f = raw / "train-images-idx3-ubyte"
        f.write_bytes(f.read_bytes()[:5000])
        return ["--dataset", "mnist", "--data-dir", tmp / "data"]
    d = make_cifar_pickles(tmp / "data", 50, 10) / "cifar-10-batches-py"
    (d / "data_batch_1").write_bytes(b"\x80\x04garbage")
    return ["--dataset", "cifar10", "--data-dir", tmp / "data"]


def _empty_imagefolder(example, tmp):
    for split in ("train", "test"):
        (tmp / "data" / split / "a").mkdir(parents=True)
    return ["--dataset", "imagefolder", "--data-dir", tmp / "data"]


def _resume_truncated(example, tmp, checkpoints):
    ckpt = shutil.copytree(checkpoints(example), tmp / "old" / "checkpoints")
    f = ckpt / (ckpt / "latest").read_text().strip() / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ["--resume", tmp / "old"]


def _resume_other_example(example, tmp, checkpoints):
    other = EXAMPLES[(EXAMPLES.index(example) + 1) % len(EXAMPLES)]
    return ["--resume", checkpoints(other)]


# id: (examples it applies to (None: all), build(example, tmp[, checkpoints]) -> flags, needles, ranks).
# Left out because the per-example suites already test them the same way in all three: malformed or
# missing config, unknown optimizer, --epochs 0, --resume at an empty folder, --output-dir under a file;
# 01's train_batch_size case at 2 ranks; 02's and 03's unreadable image files.
BAD = {
    "config_empty": (None, lambda ex, t: _text_cfg(t, ""), ["not valid JSON"], 1),
    "config_not_an_object": (None, lambda ex, t: _text_cfg(t, "[32]"), ["JSON object"], 1),
    "config_unknown_key": (None, lambda ex, t: _cfg(ex, t, lambda c: c.update(train_micro_batch_size=8)),
                           ["unknown key", "train_micro_batch_size"], 1),
    "config_section_wrong_type": (None, lambda ex, t: _cfg(ex, t, lambda c: c.update(optimizer="Adam")),
                                  ["'optimizer' must be a JSON object"], 1),
    "config_value_wrong_type": (None, lambda ex, t: _cfg(ex, t, lambda c: c.update(gradient_clipping="1.0")),
                                ["gradient_clipping must be a number"], 1),
    "config_zero_stage_wrong_type": (None, lambda ex, t: _cfg(ex, t, lambda c: c.update(
        zero_optimization={"stage": "one"})), ["DeepSpeed rejected", "DeepSpeedZeroConfig"], 1),
    "config_no_optimizer": (None, lambda ex, t: _cfg(ex, t, lambda c: c.pop("optimizer")), ["optimizer"], 1),
    "config_micro_batch_0": (None, lambda ex, t: _cfg(ex, t, lambda c: c.update(train_micro_batch_size_per_gpu=0)),
                             ["train_micro_batch_size_per_gpu", "positive"], 1),
    "train_batch_size_for_one_rank": (["02_cifar10", "03_cifar10_basic"], lambda ex, t: _cfg(ex, t, lambda c: c.update(
        train_batch_size=c["train_micro_batch_size_per_gpu"])), ["train_batch_size", "2 ranks"], 2),
    "epochs_negative": (None, lambda ex, t: ["--epochs", "-3"], ["--epochs must be a positive integer"], 1),
    "patience_0": (None, lambda ex, t: ["--patience", "0"], ["--patience must be a positive integer"], 1),
    "data_dir_is_a_file": (None, _data_dir_file, ["is a file"], 1),
    "corrupt_dataset": (None, _corrupt_dataset, ["corrupted", "--dataset synthetic"], 1),
    "imagefolder_without_images": (["02_cifar10", "03_cifar10_basic"], _empty_imagefolder, ["imagefolder"], 1),
    "resume_truncated_checkpoint": (None, _resume_truncated, ["--resume", "cannot load checkpoint"], 1),
    "resume_other_examples_checkpoint": (None, _resume_other_example, ["--resume"], 1),
}
BAD_CASES = [pytest.param(ex, case, id=f"{ex[:2]}-{case}") for case, (only, *_) in BAD.items()
             for ex in EXAMPLES if only is None or ex in only]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("example,case", BAD_CASES)
def test_bad_input(example, case, tmp_path, checkpoints):
    _, build, needles, ranks = BAD[case]
    flags = build(example, tmp_path, checkpoints) if case.startswith("resume") else build(example, tmp_path)
    flags = [str(f) for f in flags]
    if "--dataset" not in flags:
        flags = CHEAP[example] + flags
    if "--epochs" not in flags:
        flags += ["--epochs", "1", "--max-steps", "2"]
    r = launch(example, flags, tmp_path / "o", ranks=ranks)
    assert_clean_error(r, *needles)
    assert_nothing_half_written(r.output_dir)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("example", EXAMPLES)
def test_disk_full_while_saving(example, tmp_path):
    """Writes past 160 KiB fail (RLIMIT_FSIZE: EFBIG, as on a full disk), so the first model.pt (250 KB to
    1 MB) cannot be saved: one line saying so, and no file left that looks complete. The limit also
    covers the shared-memory files that 03's loader workers pass batches in; its 10 test images (120 KB a
    batch) stay under it, so only the output directory is "full", as with a real full disk."""
    flags = CHEAP[example] + ["--synthetic-size", "50"] * (example == "03_cifar10_basic")
    r = launch(example, flags + ["--epochs", "1", "--max-steps", "2"], tmp_path / "o", fsize=160 * 1024)
    assert_clean_error(r, "cannot write", "model.pt", "disk full")
    assert_nothing_half_written(r.output_dir)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("example", EXAMPLES)
def test_wandb_with_a_bad_key_warns_and_trains_on(example, tmp_path):
    """W&B asked for (online, a well-formed but bogus key) with no network (the harness's dead proxy):
    one warning, and the run goes on and finishes; W&B gives up after WANDB_INIT_TIMEOUT (10 s here)."""
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "0123456789abcdef" * 2 + "01234567",
           "WANDB_DIR": str(tmp_path), "WANDB_INIT_TIMEOUT": "10"}
    start = time.time()
    r = launch(example, CHEAP[example] + ["--epochs", "1", "--max-steps", "2"], tmp_path / "o", env=env)
    assert r.rc == 0, r
    assert r.stdout.count("warning: Weights & Biases disabled") == 1, r
    assert r.metrics["final"] is not None and "Traceback" not in r.text, r
    assert time.time() - start < 120, "W&B did not give up within WANDB_INIT_TIMEOUT"


# ============================================================================ offline data
OFFLINE = {  # the real dataset's flag, the file a download interrupted half-way leaves, what it would become
    "01_basic_convnet": ("mnist", "MNIST/raw/train-images-idx3-ubyte.gz", "MNIST/raw/train-images-idx3-ubyte",
                         "ossci-datasets.s3.amazonaws.com/mnist"),
    "02_cifar10": ("cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
    "03_cifar10_basic": ("cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("example", EXAMPLES)
def test_offline_without_data_after_a_half_download(example, tmp_path):
    """No network, and only the half-downloaded archive an interrupted download leaves: it is not taken
    for the dataset; the message gives the manual download steps and the --dataset synthetic hint, and
    no extracted dataset appears."""
    dataset, partial, extracted, hint = OFFLINE[example]
    data = tmp_path / "data"
    (data / partial).parent.mkdir(parents=True, exist_ok=True)
    (data / partial).write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(4000))  # a gzip header and then a cut
    r = launch(example, ["--dataset", dataset, "--data-dir", data], tmp_path / "o")
    assert_clean_error(r, hint, "--dataset synthetic")
    assert not (data / extracted).exists()
    assert_nothing_half_written(r.output_dir)
