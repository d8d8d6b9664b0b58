"""The fault battery (`pytest -m faults`), for all three examples, run for real on the CPU: kill -9
mid-run and --resume, ranks that must agree (a NaN batch on one rank, early stopping, divergence),
Ctrl-C and SIGTERM, a full disk, ZeRO-3, resuming on another number of ranks at every ZeRO stage,
DeepSpeed's csv monitor, W&B failing, and the other ways to launch.

Per example the battery pays for three or four launches, shared by every test (tests/drive.py runs
several runs in one launch): the `deepspeed` run killed at a random point (03: under main.py); one 2-rank `deepspeed` launch
(ranks agreeing, ZeRO-3, 01's 2-rank checkpoint without ZeRO); one 1-rank `python` launch
(signals, resuming the killed run beside a run that never stopped, a full disk, 01's 2->1
resume and its ZeRO-3 checkpoint refused on 1 rank, 02's csv monitor); for 01 one 2-rank
`torchrun` launch (a 1->2 resume). Every run is killed whole if it
hangs, so a rank left waiting in a collective fails its test instead of the suite."""

import csv
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from harness import (
    EXAMPLES,
    REPO,
    assert_clean_error,
    built_once,
    free_port,
    gloo,
    launch,
    load_example,
    make_imagefolder,
    make_mnist_idx,
    offline_env,
    write_config,
)

pytestmark = pytest.mark.faults
TIMING = {"epoch_time_s", "images_per_s", "wall_time_s"}  # all two equal runs may differ in
EVENT = re.compile(r"\| epoch +(\d+) \||^\[(\d+), +\d+\]|^epoch +(\d+)/")  # step and epoch lines
DISAGREE = ("the ranks disagreed: one stopped or skipped while another waits in a collective "
            "(a decision taken on one rank only?)")
MODELS = {"01_basic_convnet": "CNNModelEnhanced", "02_cifar10": "CIFAR10CNNEnhanced", "03_cifar10_basic": "Net"}
SIGNALS = {"01_basic_convnet": ["SIGTERM", "SIGINT"], "02_cifar10": ["SIGTERM"], "03_cifar10_basic": ["SIGTERM"]}


def data_args(example, root):
    """Flags for a small dataset of the example's real format (01: MNIST IDX files, 02: an
    ImageFolder, 03: synthetic) and a micro batch giving 10-20 steps per epoch."""
    if example == "01_basic_convnet":
        return ["--dataset", "mnist", "--data-dir", make_mnist_idx(root / "mnist", 320, 64),
                "--deepspeed_config", write_config(example, root / "c.json", lambda c: c.update(
                    train_micro_batch_size_per_gpu=16))]
    if example == "02_cifar10":
        return ["--dataset", "imagefolder", "--data-dir", make_imagefolder(root / "imgs", n_train=160, n_test=30),
                "--deepspeed_config", write_config(example, root / "c.json", lambda c: c.update(
                    train_micro_batch_size_per_gpu=8))]
    return ["--dataset", "synthetic", "--synthetic-size", "64"]


def no_zero_configs(tmp):
    """01 without ZeRO (fp32: fp16 needs ZeRO) with micro batch 16 (2 ranks) or 32 (1 rank): the
    same global batch. Only such a checkpoint resumes on another rank count in 01 (02 converts)."""
    cfg = {}
    for micro in (16, 32):
        def edit(c, micro=micro):
            c.update(train_micro_batch_size_per_gpu=micro, zero_optimization={"stage": 0})
            c.pop("fp16")
        cfg[micro] = write_config("01_basic_convnet", tmp / f"s0_{micro}.json", edit)
    return cfg


def kill_at_random(example, args, out):
    """SIGKILL the launcher and its rank at a random line of epoch 2 or 3 (a step line, or the epoch
    line, printed just before that epoch's checkpoint is written, so the kill may land mid-save).
    FAULTS_SEED=N repeats a kill point."""
    seed = int(os.environ.get("FAULTS_SEED", random.randrange(10**6)))
    rng, seen = random.Random(seed), []
    target = rng.randint(2, 22)  # events from the first epoch line on: epoch 2, or early epoch 3

    def kill_at(line, p):
        if EVENT.search(line) and (seen or line.startswith("epoch   1/")):
            seen.append(line)
            if len(seen) == target:
                os.killpg(p.pid, signal.SIGKILL)

    how = "main.py" if example == "03_cifar10_basic" else "deepspeed"  # 03's launcher builds that command
    run = launch(example, args, output_dir=out, on_line=kill_at, timeout=240, launcher=how)
    run.why = f"(FAULTS_SEED={seed}: killed at {seen[-1].strip()[:70]!r})" if seen else f"(seed {seed})"
    if run.rc == -signal.SIGKILL:  # what a kill during the next save leaves: a half-written folder
        tag = (out / "checkpoints" / "latest").read_text().strip()
        nxt = out / "checkpoints" / f"epoch{int(tag[5:]) + 1:04d}"
        if not nxt.exists():
            nxt.mkdir()
            blob = (out / "checkpoints" / tag / "mp_rank_00_model_states.pt").read_bytes()
            (nxt / "mp_rank_00_model_states.pt").write_bytes(blob[: len(blob) // 2])
        run.tag = tag
    return run


def signal_in_epoch_2(names):
    """on_line for a tests/drive.py launch: runs 0..len(names)-1 each get its signal at a step line
    of their epoch 2 (once the first checkpoint exists)."""
    done, sent = set(), []

    def on_line(line, p):
        m = re.match(r"@@ run (\d+) ", line)
        if m:
            done.add(int(m.group(1)))
        k = len(done)
        e = EVENT.search(line)
        if k < len(names) and len(sent) == k and e and line.startswith(("  step", "[2,")) \
                and (e.group(1) or e.group(2)) == "2":
            sent.append(line)
            os.kill(p.pid, getattr(signal, names[k]))

    on_line.sent = sent
    return on_line


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    """battery(example) -> the example's launches (built once per worker, on first use)."""
    return built_once(build, tmp_path_factory)


def build(example, tmp):
    base = data_args(example, tmp) + ["--log-interval", "1"]
    if example != "03_cifar10_basic":  # 03 ships WarmupLR only: no schedule sized in epochs
        base += ["--warmup-epochs", "1"]
    b = {"tmp": tmp, "base": base}
    b["kill_args"] = base + ["--epochs", "4", "--seed", "7"]
    b["killed"] = kill_at_random(example, b["kill_args"], tmp / "kill")
    b["killed"].final = json.loads((tmp / "kill" / "metrics.json").read_text())["final"]  # before --resume

    # 2 ranks, `deepspeed`: ranks agreeing (runs 0-2), ZeRO-3 (run 3), 01: 2-rank runs without ZeRO
    other = write_config(example, tmp / "other.json", lambda c: c.update(train_micro_batch_size_per_gpu=2))
    # 03 skips non-finite steps where DeepSpeed does (bf16 here); in fp32 its first one ends the run
    skips, give_up = (["--dtype", "bf16"], []) if example == "03_cifar10_basic" else ([], ["--max-bad-steps", "2"])
    # early stopping (no gain of 1e9 in an epoch) ends epoch 2; 03 has none: --max-steps ends it
    stop = ["--patience", "1", "--min-improvement", "1e9"]
    if example == "03_cifar10_basic":
        stop = ["--max-steps", "16"]  # the end of epoch 2: 64 images, 4 a micro-batch, 2 ranks
    two = [base + skips + stop + ["--epochs", "4", "--output-dir", tmp / "a"],
           base + give_up + ["--epochs", "2", "--output-dir", tmp / "b"],
           base + ["--epochs", "3", "--resume", "--output-dir", tmp / "a", "--deepspeed_config", other]]
    z3 = write_config(example, tmp / "z3.json", name="ds_config_zero3.json", edit=lambda c: c.update(
        train_micro_batch_size_per_gpu={"01_basic_convnet": 16, "02_cifar10": 8, "03_cifar10_basic": 4}[example]))
    more = ["--synthetic-size", "320"] if example == "03_cifar10_basic" else []
    two += [base + more + ["--deepspeed_config", z3, "--epochs", "2", "--log-interval", "5",
                           "--output-dir", tmp / "z3"]]
    if example == "01_basic_convnet":
        cfg = b["cfg"] = no_zero_configs(tmp)
        resume = base[:4] + ["--epochs", "2", "--warmup-epochs", "1", "--log-interval", "5", "--seed", "3"]
        two += [resume + ["--deepspeed_config", cfg[16], "--output-dir", tmp / "ref2"],
                resume + ["--deepspeed_config", cfg[16], "--output-dir", tmp / "cut2", "--max-steps", "10"]]
    if example == "02_cifar10":  # a ZeRO checkpoint of SGD, which ds_to_universal cannot convert
        sgd = b["sgd_zero"] = write_config(example, tmp / "sgdz.json", lambda c: c.update(
            train_micro_batch_size_per_gpu=8, zero_optimization={"stage": 1},
            zero_allow_untested_optimizer=True))
        two += [base + ["--deepspeed_config", sgd, "--epochs", "1", "--max-steps", "2",
                        "--output-dir", tmp / "sgdz"]]
    # 03's 2-rank runs go through `torchrun` (its other tests use `deepspeed`)
    launcher = "torchrun" if example == "03_cifar10_basic" else "deepspeed"
    b["two"] = launch(example, runs=two, ranks=2, drive=["--nan", "0:1:1:2,1:1:1:1,1:1:1:2", "--weights",
                                                         tmp / "w"], cwd=tmp, timeout=400, stall=60,
                      hang_hint=DISAGREE, launcher=launcher)

    # 1 rank, `python`: signals, the killed run resumed and its reference, a full disk, 01: 2->1
    names = SIGNALS[example]
    one = [base + ["--epochs", "3", "--output-dir", tmp / f"sig{k}"] for k in range(len(names))]
    b["resumed_kill"] = len(one)
    one += [b["kill_args"] + ["--resume", "--output-dir", tmp / "kill"],
            b["kill_args"] + ["--output-dir", tmp / "ref"],
            base + ["--epochs", "1", "--max-steps", "2", "--output-dir", tmp / "full"]]
    b["full"] = len(one) - 1
    b["resumed_signal"] = len(one)
    one += [base + ["--epochs", "3", "--resume", "--output-dir", tmp / f"sig{k}"] for k in range(len(names))]
    if example == "01_basic_convnet":  # 2 -> 1 rank without ZeRO; a 2-rank ZeRO-3 checkpoint refused
        b["resumed_2to1"] = len(one)
        one += [resume + ["--deepspeed_config", cfg[32], "--output-dir", tmp / "cut2", "--resume"],
                resume + ["--deepspeed_config", cfg[32], "--output-dir", tmp / "ref1"],
                resume + ["--deepspeed_config", cfg[32], "--output-dir", tmp / "cut1", "--max-steps", "10"],
                base + ["--deepspeed_config", z3, "--epochs", "3", "--resume", tmp / "z3", "--output-dir",
                        tmp / "z3_1"]]
    if example == "02_cifar10":  # the 2-rank ZeRO checkpoints on 1 rank: AdamW's and SGD's
        b["z3_2to1"] = len(one)
        one += [base + ["--deepspeed_config", z3, "--epochs", "3", "--log-interval", "5",
                        "--resume", tmp / "z3", "--output-dir", tmp / "z3_1"],
                base + ["--deepspeed_config", b["sgd_zero"], "--epochs", "2", "--resume",
                        "--output-dir", tmp / "sgdz"]]
    if example == "02_cifar10":  # DeepSpeed's csv monitor: a run cut after epoch 1 and resumed
        b["monitor"] = len(one)
        mon = write_config(example, tmp / "mon.json", lambda c: c.update(
            train_micro_batch_size_per_gpu=8, csv_monitor={"enabled": True}))
        watched = base + ["--deepspeed_config", mon, "--epochs", "2"]
        one += [watched + ["--output-dir", tmp / "mon_ref"],
                watched + ["--output-dir", tmp / "mon_cut", "--max-steps", "20"],
                watched + ["--output-dir", tmp / "mon_cut", "--resume"]]
    on_line = signal_in_epoch_2(names)
    b["one"] = launch(example, runs=one, launcher="python", drive=["--fsize", f"{b['full']}:{160 * 1024}"],
                      on_line=on_line, cwd=tmp, timeout=500, stall=60)
    b["sent"] = on_line.sent

    # 01 only, 2 ranks, `torchrun`: the 1-rank checkpoint continues on 2 ranks
    if example == "01_basic_convnet":
        b["torchrun"] = launch(example, runs=[resume + ["--deepspeed_config", cfg[16], "--output-dir",
                                                        tmp / "cut1", "--resume"]],
                               ranks=2, launcher="torchrun", cwd=tmp, timeout=300, stall=60)
    return b


def comparable(metrics):
    rows = [{k: v for k, v in e.items() if k not in TIMING} for e in metrics["epochs"]]
    return rows, {k: v for k, v in (metrics["final"] or {}).items() if k not in TIMING}


def same_weights(a, b):
    wa, wb = (torch.load(p / "model.pt", weights_only=True) for p in (a, b))
    return wa.keys() == wb.keys() and all(
        torch.equal(wa[k], wb[k]) if torch.is_tensor(wa[k]) else wa[k] == wb[k] for k in wa)


def check_model_pt(example, out, classes):
    """model.pt is the whole model as a plain state dict (not ZeRO partitions)."""
    model = getattr(load_example(example), MODELS[example])(num_classes=classes)
    state = torch.load(out / "model.pt", weights_only=True)
    assert state.keys() == model.state_dict().keys()
    assert all(state[k].shape == v.shape for k, v in model.state_dict().items() if k != "_extra_state")
    model.load_state_dict(state)
    assert len(model.classes) == classes  # the names model.pt carries


def read(tmp, name):
    return json.loads((tmp / name / "metrics.json").read_text())


def rows(metrics):
    return comparable(metrics)[0]


# ============================================================================ kill -9 and resume
@pytest.mark.parametrize("example", EXAMPLES)
def test_kill_then_resume_matches_an_uninterrupted_run(example, battery):
    """Killed at a random point, with a half-written next checkpoint left beside the last one,
    --resume must end with exactly the metrics and model.pt of an uninterrupted run: the CPU runs
    are deterministic, so any difference means lost state or an epoch trained twice."""
    b = battery(example)
    killed, tmp, why = b["killed"], b["tmp"], b["killed"].why
    assert killed.rc == -signal.SIGKILL, f"{why}\n{killed}"
    assert killed.final is None, why
    resumed, ref = b["one"].part(b["resumed_kill"]), b["one"].part(b["resumed_kill"] + 1)
    assert resumed.rc == 0 and ref.rc == 0, f"{why}\n{b['one']}"
    assert f"continuing at epoch {int(killed.tag[5:]) + 1}" in resumed.stdout, why
    assert comparable(read(tmp, "kill")) == comparable(read(tmp, "ref")), why
    assert same_weights(tmp / "ref", tmp / "kill"), why


# ============================================================================ ranks agree
@pytest.mark.parametrize("example", EXAMPLES)
def test_ranks_agree_on_skipping_stopping_and_giving_up(example, battery):
    """Two ranks, three runs in the same processes:
    - a NaN batch on rank 1 alone in epoch 1: the step is skipped on both ranks, counted once, and
      both ranks hold the same model after every epoch (checksums); then early stopping (no gain of
      1e9 in one epoch) ends epoch 2 on both ranks: had one rank gone on alone it would wait in a
      collective, and the run would stall;
    - two NaN batches on rank 1 with --max-bad-steps 2: both ranks stop, rank 0 prints the
      diagnosis, exit code 3, no result files (03 skips only in bf16/fp16: its first run is bf16, and
      its fp32 run stops at the first non-finite loss);
    - a resume of the first run with another micro batch: training goes on (02: with a one-line
      notice)."""
    b = battery(example)
    r, tmp = b["two"], b["tmp"]
    first, diverged, resumed = r.part(0), r.part(1), r.part(2)
    assert first.rc == 0, r
    epochs = read(tmp, "a")["epochs"][:2]  # (the resume below keeps these rows)
    assert [e["skipped_steps"] for e in epochs] == [1, 0], epochs
    assert epochs[0]["train_images"] < epochs[1]["train_images"], epochs  # the skipped batch is not counted
    assert all(math.isfinite(e[k]) for e in epochs for k in ("train_loss", "test_loss", "grad_norm"))
    stopped = "Stopping at --max-steps" if example == "03_cifar10_basic" else "Early stopping"
    assert first.stdout.count(stopped) == 1 and "skipped 1 |" in first.stdout, first
    ranks = [[e for e in map(json.loads, (tmp / "w" / f"rank{k}.jsonl").read_text().splitlines())
              if e["run"] == 0] for k in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) >= 2, ranks  # the same model on both ranks

    gave_up = {"01_basic_convnet": "2 non-finite steps in a row", "02_cifar10": "2 non-finite steps "
               "in epoch 1", "03_cifar10_basic": "non-finite loss"}[example]
    assert_clean_error(diverged.rc, diverged.stderr, "training diverged", gave_up, "check:")
    assert diverged.rc == 3
    assert not (tmp / "b" / "model.pt").exists() and not (tmp / "b" / "metrics.json").exists()

    assert resumed.rc == 0, r
    if example == "02_cifar10":  # 01 and 03 resume with the config given, saying nothing
        assert "notice: the checkpoint's micro batch x accumulation x ranks was" in resumed.stdout, resumed
    assert "continuing at epoch 3" in resumed.stdout


# ============================================================================ stopped by a signal
@pytest.mark.parametrize("example", EXAMPLES)
def test_a_stopped_run_says_how_to_resume(example, battery):
    """SIGTERM (all three) and Ctrl-C's SIGINT (01) once the first checkpoint exists: one line naming
    the epoch that is checkpointed (01 and 03: saying it stopped, with its exit code) and the way to
    go on, exit code 143 or 130, nothing half-written, and --resume then continues from there."""
    b = battery(example)
    names, tmp = SIGNALS[example], b["tmp"]
    assert len(b["sent"]) == len(names), b["one"]
    for k, name in enumerate(names):
        stopped, again = b["one"].part(k), b["one"].part(b["resumed_signal"] + k)
        assert stopped.rc == {"SIGTERM": 143, "SIGINT": 130}[name], (name, stopped)
        said = "stopped: epoch 1 is checkpointed"
        if example != "02_cifar10":  # the resume command on a signal is 02's
            said = f"stopped (exit code {stopped.rc})"
        assert_clean_error(stopped.rc, stopped.stderr, said, "--resume")
        assert again.rc == 0 and "continuing at epoch 2" in again.stdout, (name, again)
        assert not [p for p in (tmp / f"sig{k}").rglob("*") if ".tmp" in p.name]


def test_ctrl_c_under_the_launcher(tmp_path):
    """Ctrl-C in a terminal signals the launcher and its ranks together: the rank says which epoch is
    checkpointed, the launcher exits non-zero, and --resume (here under plain `python`) continues."""
    sent = []

    def ctrl_c(line, p):
        if not sent and EVENT.search(line) and "| epoch   2 |" in line:
            sent.append(line)
            os.killpg(p.pid, signal.SIGINT)

    args = ["--dataset", "imagefolder", "--data-dir", make_imagefolder(tmp_path / "imgs", n_train=80, n_test=30),
            "--epochs", "3", "--log-interval", "1", "--deepspeed_config",
            write_config("02_cifar10", tmp_path / "c.json", lambda c: c.update(train_micro_batch_size_per_gpu=8))]
    r = launch("02_cifar10", args, output_dir=tmp_path / "o", on_line=ctrl_c, timeout=200)
    assert sent and r.rc not in (0, None), r
    assert "stopped: epoch 1 is checkpointed" in r.stderr + r.stdout, r
    assert (tmp_path / "o" / "checkpoints" / "latest").read_text().strip() == "epoch0001"
    again = launch("02_cifar10", args + ["--resume"], output_dir=tmp_path / "o", launcher="python")
    assert again.rc == 0 and "continuing at epoch 2" in again.stdout, again


# ============================================================================ disk full, W&B
@pytest.mark.parametrize("example", EXAMPLES)
def test_disk_full_while_saving(example, battery):
    """Writes past 160 KiB fail (RLIMIT_FSIZE: EFBIG, as on a full disk), so the first model.pt cannot
    be saved: one line saying so, and no file left that looks complete."""
    b = battery(example)
    r, out = b["one"].part(b["full"]), b["tmp"] / "full"
    assert_clean_error(r.rc, r.stderr, "cannot write", "model.pt", "disk full")
    assert not (out / "metrics.json").exists() and not (out / "model.pt").exists()
    assert not (out / "checkpoints" / "latest").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], list(out.rglob("*"))


@pytest.mark.parametrize("example", ["01_basic_convnet", "02_cifar10"])  # 03 has no W&B
def test_wandb_with_a_bad_key_warns_once_and_training_goes_on(example, tmp_path, monkeypatch, capsys):
    """W&B asked for (online, a well-formed but bogus key) with no network: one warning within
    W&B's own init timeout, and the run goes on without it."""
    for k, v in {"WANDB_MODE": "online", "WANDB_API_KEY": "0123456789abcdef" * 2 + "01234567",
                 "WANDB_DIR": str(tmp_path), "WANDB_INIT_TIMEOUT": "5", "https_proxy": "http://127.0.0.1:9",
                 "http_proxy": "http://127.0.0.1:9", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(k, v)
    mod = load_example(example)
    start = time.time()
    with gloo():
        assert mod.init_wandb(mod.parse_args([]), {}) is None
    assert time.time() - start < 60
    assert capsys.readouterr().out.count("warning: Weights & Biases disabled") == 1


# ============================================================================ ZeRO
@pytest.mark.parametrize("example", EXAMPLES)
def test_zero3_on_two_ranks(example, battery):
    """ZeRO-3: trains, evaluates and saves on every rank without hanging, and model.pt is the whole
    model as a plain state dict."""
    b = battery(example)
    r = b["two"].part(3)
    assert r.rc == 0, b["two"]
    m = read(b["tmp"], "z3")
    assert m["config"]["zero_optimization"]["stage"] == 3 and m["world_size"] == 2
    assert m["final"]["test_accuracy"] > 100 / len(m["final"]["classes"]) + 10, m["final"]
    check_model_pt(example, b["tmp"] / "z3", len(m["final"]["classes"]))


def test_two_ranks_checkpoint_continues_on_one(battery):
    """Without ZeRO a checkpoint does not depend on the rank count: one of 2 ranks x micro 16 goes on
    with 1 rank x micro 32 (the same global batch) and ends as the 2-rank run that never stopped."""
    b = battery("01_basic_convnet")
    tmp = b["tmp"]
    for k in (4, 5):
        assert b["two"].part(k).rc == 0, b["two"]
    resumed = b["one"].part(b["resumed_2to1"])
    assert resumed.rc == 0, b["one"]
    assert "continuing at epoch 2" in resumed.stdout, resumed
    for a, c in zip(rows(read(tmp, "ref2")), rows(read(tmp, "cut2")), strict=True):
        # equal up to float summation order: 2x16 vs 1x32
        assert a.keys() == c.keys() and all(a[k] == pytest.approx(c[k], rel=1e-5, abs=1e-6) for k in a), (a, c)
    check_model_pt("01_basic_convnet", tmp / "cut2", 10)


def test_one_rank_checkpoint_continues_on_two(battery):
    """A checkpoint of 1 rank x micro 32 without ZeRO goes on with 2 ranks x micro 16 under
    `torchrun` and follows the 1-rank run that never stopped."""
    b = battery("01_basic_convnet")
    tmp, first = b["tmp"], b["resumed_2to1"]
    assert b["one"].part(first + 1).rc == 0 and b["one"].part(first + 2).rc == 0, b["one"]
    resumed = b["torchrun"].part(0)
    assert resumed.rc == 0, b["torchrun"]
    assert resumed.metrics(tmp / "cut1")["world_size"] == 2
    assert "continuing at epoch 2" in resumed.stdout, resumed
    for a, c in zip(rows(read(tmp, "ref1")), rows(read(tmp, "cut1")), strict=True):
        assert a["lr"] == pytest.approx(c["lr"], rel=1e-9) and a["train_images"] == c["train_images"]
        for key in ("train_loss", "test_loss", "grad_norm"):
            assert a[key] == pytest.approx(c[key], rel=1e-3), (key, a, c)


def test_zero_checkpoint_on_another_count_is_refused_naming_02(battery):
    """01 keeps no universal-checkpoint conversion: its 2-rank ZeRO-3 checkpoint is refused on 1
    rank in one line, before anything starts, naming the rank count, ds_to_universal and 02."""
    b = battery("01_basic_convnet")
    r = b["one"].part(b["resumed_2to1"] + 3)
    assert_clean_error(r.rc, r.stderr, "ZeRO stage 3", "2 ranks", "ds_to_universal", "02_cifar10")
    assert r.rc == 2 and "Resumed" not in r.stdout and not (b["tmp"] / "z3_1").exists(), r


def test_adamw_zero3_checkpoint_continues_on_another_count(battery):
    """02's shipped ZeRO config uses AdamW, whose moments DeepSpeed's ds_to_universal converts: its
    2-rank ZeRO-3 checkpoint goes on with 1 rank."""
    b = battery("02_cifar10")
    resumed = b["one"].part(b["z3_2to1"])
    assert resumed.rc == 0, b["one"]
    assert "Converting" in resumed.stdout and "continuing at epoch 3" in resumed.stdout, resumed
    m = read(b["tmp"], "z3_1")
    assert m["world_size"] == 1 and [e["epoch"] for e in m["epochs"]] == [1, 2, 3], m["epochs"]


def test_sgd_zero_checkpoint_on_another_count_is_refused_in_one_line(battery):
    """ds_to_universal (DeepSpeed 0.19.8) reads Adam's moments at every ZeRO stage: a 2-rank ZeRO
    checkpoint of SGD is refused on 1 rank before anything starts, saying what works instead."""
    b = battery("02_cifar10")
    r = b["one"].part(b["z3_2to1"] + 1)
    assert_clean_error(r.rc, r.stderr, "ds_to_universal", "SGD", "ZeRO stage 1", "2 ranks", "Adam")
    assert r.rc == 2 and "Resumed" not in r.stdout and "Loading" not in r.stdout, r
    assert not list((b["tmp"] / "sgdz" / "checkpoints").glob("*universal*"))


def test_csv_monitor_rows_once_each(battery):
    """DeepSpeed's csv monitor (02): the script adds train loss and accuracy per log line and the
    epoch's numbers, indexed by samples like DeepSpeed's own lr rows; a run cut after epoch 1 and
    resumed ends with one header and the same rows as the run that never stopped."""
    b = battery("02_cifar10")
    tmp = b["tmp"]
    for k in range(3):
        assert b["one"].part(b["monitor"] + k).rc == 0, b["one"]

    def table(run):
        out = {}
        for f in sorted((tmp / run / "monitor" / "02_cifar10").glob("*.csv")):
            with open(f) as fh:
                lines = list(csv.reader(fh))
            assert lines[0][0] == "step" and all(r[0] != "step" for r in lines[1:]), f
            out[f.name] = [(int(float(r[0])), float(r[1])) for r in lines[1:]]
        return out

    ref, res = table("mon_ref"), table("mon_cut")
    assert {"Train_Samples_lr.csv", "Train_Samples_train_loss.csv", "Epoch_Samples_test_accuracy.csv"} <= set(ref)
    assert ref.keys() == res.keys()
    for name in ref:
        steps = [s for s, _ in res[name]]
        assert steps == sorted(set(steps)) == [s for s, _ in ref[name]], name  # no row twice
        assert [v for _, v in res[name]] == pytest.approx([v for _, v in ref[name]], rel=1e-5), name


# ============================================================================ other launchers
def test_main_py_passes_the_exit_code_on(tmp_path):
    """03's Python launcher builds the `deepspeed` command (its training run is the one the kill
    test above stops); the exit code is the script's, and a missing `deepspeed` is one line."""
    main = REPO / "03_cifar10_basic" / "main.py"
    bad = subprocess.run([sys.executable, main, "--num_gpus", "1", "--master_port", str(free_port()), "--",
                          "--epochs", "0", "--output-dir", tmp_path / "o"],
                         capture_output=True, text=True, env=offline_env(), cwd=tmp_path, timeout=300)
    assert bad.returncode == 2 and "--epochs must be at least 1" in bad.stderr, bad.stderr[-2000:]
    assert "--deepspeed --deepspeed_config" in bad.stdout
    py = tmp_path / "python3"  # a Python whose folder holds no `deepspeed`: main.py says so
    py.symlink_to(sys.executable)
    p = subprocess.run([py, main, "--num_gpus", "1"], capture_output=True, text=True,
                       env={**offline_env(), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "`deepspeed` command is not on PATH" in p.stderr
