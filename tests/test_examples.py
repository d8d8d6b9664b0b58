"""Every example, end to end through the real `deepspeed` launcher on the CPU (gloo): one 2-rank run
of train_ds.py, and one 1-rank launch that runs several trainings in the same ranks
(tests/drive.py): the same global batch on one rank, an interrupted run and its resume, and
gradient accumulation with a skipped step. Small generated data; every assertion reads what the
runs printed or wrote."""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import torch
from harness import (
    EXAMPLES,
    PORTS,
    REPO,
    launch,
    load_example,
    make_imagefolder,
    make_mnist_idx,
    offline_env,
)
from harness import write_config as config

# Per example: its data flags, sizes, the micro batch of the 1-rank runs (the 2-rank run uses half,
# so both see the same global batches), the model class, and the accuracy that proves learning.
SPEC = {
    "01_basic_convnet": dict(train=640, test=200, micro=32, model="CNNModelEnhanced", learned=50),
    "02_cifar10": dict(train=192, test=60, micro=16, model="CIFAR10CNNEnhanced", learned=70),
    "03_cifar10_basic": dict(train=320, test=64, micro=8, model="Net", learned=30),
}
EPOCHS = 2
VAL_SPLIT = 48  # 02's training images held out to choose model.pt on


def steps_per_epoch(example, ranks):
    s = SPEC[example]
    return -(-(s["train"] // ranks) // (s["micro"] // ranks))  # ceil: a last, smaller batch



def same(a, b):
    """Equal state-dict entries: tensors element for element, the class names (extra state) as is."""
    return torch.equal(a, b) if torch.is_tensor(a) else a == b

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Per example: data flags and configs of the 1-rank and 2-rank micro batch."""
    root = tmp_path_factory.mktemp("data")
    out = {}
    for ex, s in SPEC.items():
        data = {"01_basic_convnet": lambda: ["--dataset", "mnist", "--data-dir",
                                             make_mnist_idx(root / "mnist", s["train"], s["test"])],
                "02_cifar10": lambda: ["--dataset", "imagefolder", "--data-dir", make_imagefolder(
                    root / "imgs", n_train=s["train"], n_test=s["test"])],
                "03_cifar10_basic": lambda: ["--dataset", "synthetic", "--synthetic-size", s["train"]],
                }[ex]()
        cfg = {r: config(ex, root / f"{ex}_{r}.json", lambda c, r=r: c.update(
            train_micro_batch_size_per_gpu=s["micro"] // r)) for r in (1, 2)}
        def gas2_edit(c, ex=ex, micro=s["micro"]):
            c.update(train_micro_batch_size_per_gpu=micro // 2, gradient_accumulation_steps=2)
            if ex == "02_cifar10":  # it skips on the device (fused SGD's found_inf), and its LR
                c.pop("scheduler")  # schedule steps on over a skipped step: keep lr constant
        gas2 = config(ex, root / f"{ex}_gas2.json", gas2_edit)
        common = data + ["--epochs", EPOCHS, "--log-interval", 1]
        if ex != "03_cifar10_basic":  # 03 ships WarmupLR only: no schedule sized in epochs
            common += ["--warmup-epochs", 1]
        # 03 skips a non-finite step where DeepSpeed does (bf16, fp16); in fp32 it stops (exit 3)
        skips = ["--dtype", "bf16"] if ex == "03_cifar10_basic" else []
        out[ex] = dict(common=common, cfg=cfg, gas2=gas2, skips=skips)
    return out


def jobs(ex, st, tmp):
    """The two launches of one example: (name, function) pairs."""
    two = partial(launch, ex, st["common"] + ["--deepspeed_config", st["cfg"][2]],
                  output_dir=tmp / "two", ranks=2, timeout=300)
    one_epoch = steps_per_epoch(ex, 1)
    sequence = [
        st["common"] + ["--deepspeed_config", st["cfg"][1], "--output-dir", tmp / "one"],
        st["common"] + ["--deepspeed_config", st["cfg"][1], "--output-dir", tmp / "cut",
                        "--max-steps", one_epoch],
        st["common"] + ["--deepspeed_config", st["cfg"][1], "--output-dir", tmp / "cut", "--resume"],
        # gradient accumulation 2: a NaN in micro-batch 3 skips the step of micro-batches 2 and 3;
        # the same run without those two micro-batches must end with the same weights
        st["common"] + st["skips"] + ["--deepspeed_config", st["gas2"], "--output-dir",
                                      tmp / "gas_nan", "--epochs", 1],
        st["common"] + st["skips"] + ["--deepspeed_config", st["gas2"], "--output-dir",
                                      tmp / "gas_drop", "--epochs", 1],
        st["common"] + ["--deepspeed_config", st["cfg"][1], "--output-dir", tmp / "ow", "--epochs",
                        1, "--max-steps", 2],
        st["common"] + ["--deepspeed_config", st["cfg"][1], "--output-dir", tmp / "ow", "--epochs",
                        1, "--max-steps", 3, "--overwrite"],
    ]
    nan = ["3:0:1:3"]
    if ex == "02_cifar10":  # --val-split, 3 epochs; every batch of epoch 3 NaN: all its steps skip
        sequence.append(st["common"] + ["--deepspeed_config", st["cfg"][1], "--output-dir",
                                        tmp / "val", "--val-split", VAL_SPLIT, "--epochs", 3])
        nan += [f"{len(sequence) - 1}:0:3:{b}" for b in range(steps_per_epoch(ex, 1))]
    one = partial(launch, ex, runs=sequence, drive=["--nan", ",".join(nan), "--drop",
                                                    "4:0:1:2,4:0:1:3"], cwd=tmp, timeout=400)
    return [((ex, "two"), two), ((ex, "one"), one)]


def parity():
    """The examples' training step against plain PyTorch (tests/parity_check.py): one process."""
    cases = ["01_basic_convnet:auto", "01_basic_convnet:bf16", "02_cifar10:auto", "02_cifar10:bf16",
             "03_cifar10_basic:auto", f"03_cifar10_basic:fp32:{REPO}/03_cifar10_basic/ds_config_zero2.json"]
    p = subprocess.run([sys.executable, str(REPO / "tests" / "parity_check.py"), *cases, "--steps", "16"],
                       capture_output=True, text=True, env=offline_env(), cwd=REPO / "tests", timeout=300)
    return p, cases


@pytest.fixture(scope="module")
def launched(setup, tmp_path_factory):
    """Every launch of this file, two at a time: each is mostly one core's worth of imports and
    small steps, so two share the machine's cores well. {key: result}."""
    work = [(("parity",), parity)]
    for ex in EXAMPLES:
        work += jobs(ex, setup[ex], tmp_path_factory.mktemp(ex))
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        futures = {key: pool.submit(fn) for key, fn in work}
        return {key: f.result() for key, f in futures.items()}


@pytest.fixture(params=EXAMPLES)
def runs(request, launched):
    """The 2-rank run and the 1-rank sequence of one example, and the sequence's folder."""
    ex = request.param
    one = launched[(ex, "one")]
    return ex, launched[(ex, "two")], one, launched[(ex, "two")].output_dir.parent


def test_two_ranks_learn_and_report_global_numbers(runs):
    ex, two, _, _ = runs
    s, m = SPEC[ex], two.metrics()
    assert two.rc == 0, two
    assert m["world_size"] == 2 and m["example"] == ex and len(m["epochs"]) == EPOCHS
    for e in m["epochs"]:
        assert e["train_images"] == s["train"] and e["test_images"] == s["test"], e  # all ranks
        for key in ("train_loss", "train_accuracy", "test_accuracy", "lr", "grad_norm",
                    "skipped_steps", "epoch_time_s", "images_per_s"):
            assert key in e
    assert m["final"]["test_accuracy"] >= s["learned"], m["final"]  # learned: far above chance
    assert m["final"]["quality"] in ("Fair", "Good", "Excellent")
    sched = m["config"]["scheduler"]
    if sched["type"] == "WarmupCosineLR":  # sized for 2 ranks: the LR reaches 0 at the last step
        assert sched["params"]["total_num_steps"] == EPOCHS * steps_per_epoch(ex, 2), sched
        assert m["epochs"][-1]["lr"] < 1e-9, m["epochs"][-1]
    assert "train_batch_size" not in m["config"]


def test_two_ranks_print_once_and_warn_about_nothing(runs):
    _, two, _, _ = runs
    assert two.stdout.count("DeepSpeed CNN training:") == 1, two
    assert two.stdout.count("Training finished") == 1 and "Traceback" not in two.text, two
    assert "Early stopping" not in two.stdout  # the run simply reached its last epoch
    worker = two.text.split("spawned with command")[-1]  # the lines after the workers started
    warnings = [ln for ln in worker.splitlines() if re.search(r"warning", ln, re.I)
                and "real_accelerator.py" not in ln]  # CPU only: "Setting accelerator to CPU"
    assert not warnings, warnings


def test_outputs_load_without_deepspeed(runs):
    ex, two, _, _ = runs
    mod = load_example(ex)
    classes = len(two.metrics()["final"]["classes"])
    model = getattr(mod, SPEC[ex]["model"])(num_classes=classes)
    model.load_state_dict(torch.load(two.output_dir / "model.pt", weights_only=True))
    assert (two.output_dir / "curves.png").stat().st_size > 1000
    ckpts = sorted(p.name for p in (two.output_dir / "checkpoints").iterdir())
    assert "latest" in ckpts and 1 <= len([c for c in ckpts if c.startswith("epoch")]) <= 2, ckpts
    assert not [p for p in two.output_dir.rglob("*") if ".tmp" in p.name]


def test_no_shared_memory_left_behind(runs):
    import glob
    import os

    left = [p for port in PORTS for p in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}"
                                                   f"_*_{port}_*")]
    assert not left, left


def test_one_rank_reports_what_two_ranks_report(runs):
    """1 rank x micro M and 2 ranks x M/2 train on the same samples in the same order (rank r takes
    every world-th place of the epoch's permutation) with the same mean gradient, so every global
    number agrees up to float summation order. A rank training on another's shard, a metric left
    unreduced or a schedule sized for one rank would be off by far more. (02 is left out: its
    BatchNorm normalizes each rank's own micro-batch, so its numbers legitimately differ.)"""
    ex, two, one, tmp = runs
    run = one.part(0)
    assert run.rc == 0, run
    a, b = run.metrics(tmp / "one"), two.metrics()
    assert a["config"]["scheduler"] == b["config"]["scheduler"]  # the same step counts
    if ex == "02_cifar10":
        assert a["final"] is not None
        pytest.skip("BatchNorm statistics differ between the two layouts")
    for epoch, (ea, eb) in enumerate(zip(a["epochs"], b["epochs"], strict=True)):
        assert ea["train_images"] == eb["train_images"] and ea["test_images"] == eb["test_images"]
        assert ea["lr"] == pytest.approx(eb["lr"], rel=1e-9)
        close = 1e-4 if epoch == 0 else 3e-2  # later, Adam amplifies the summation-order noise
        for key in ("train_loss", "test_loss", "grad_norm"):
            assert ea[key] == pytest.approx(eb[key], rel=close * (1 + (key == "grad_norm"))), (key, ea, eb)
        for key in ("train_accuracy", "test_accuracy"):
            assert ea[key] == pytest.approx(eb[key], abs=0.01 if epoch == 0 else 2.0), (key, ea, eb)


def test_resume_continues_as_if_never_stopped(runs):
    ex, _, one, tmp = runs
    cut, resumed = one.part(1), one.part(2)
    assert cut.rc == 0 and resumed.rc == 0, one
    assert f"Stopping at --max-steps {steps_per_epoch(ex, 1)}" in cut.stdout
    assert "continuing at epoch 2" in resumed.stdout
    a, b = one.part(0).metrics(tmp / "one"), resumed.metrics(tmp / "cut")
    timing = ("epoch_time_s", "images_per_s")
    assert [{k: v for k, v in e.items() if k not in timing} for e in a["epochs"]] == \
        [{k: v for k, v in e.items() if k not in timing} for e in b["epochs"]]
    wa = torch.load(tmp / "one" / "model.pt", weights_only=True)
    wb = torch.load(tmp / "cut" / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys() and all(same(wa[k], wb[k]) for k in wa)


def test_a_skipped_step_does_not_shift_accumulation_windows(runs):
    """Accumulation 2, a NaN in micro-batch 3 of epoch 1: the step of micro-batches 2-3 is skipped,
    and the run ends with exactly the weights of a run that never saw those two micro-batches."""
    _, _, one, tmp = runs
    skipped, dropped = one.part(3), one.part(4)
    assert skipped.rc == 0 and dropped.rc == 0, one
    ms, md = skipped.metrics(tmp / "gas_nan"), dropped.metrics(tmp / "gas_drop")
    assert [e["skipped_steps"] for e in ms["epochs"]] == [1], ms["epochs"]
    assert all(e["skipped_steps"] == 0 for e in md["epochs"])
    wa = torch.load(tmp / "gas_nan" / "model.pt", weights_only=True)
    wb = torch.load(tmp / "gas_drop" / "model.pt", weights_only=True)
    assert all(same(wa[k], wb[k]) for k in wa), "a skipped step shifted the later windows"


def test_overwrite_replaces_a_run(runs):
    _, _, one, tmp = runs
    first, second = one.part(5), one.part(6)
    assert first.rc == 0 and second.rc == 0, one
    m = json.loads((tmp / "ow" / "metrics.json").read_text())
    assert m["args"]["overwrite"] and m["args"]["max_steps"] == 3
    assert "Stopping at --max-steps 3" in second.stdout


@pytest.mark.parametrize("ex", ["02_cifar10"])  # the rung that has --val-split
def test_val_split_chooses_model_pt_on_held_out_images(launched, ex):
    """02 with --val-split: model.pt is the best epoch on the held-out training images (never chosen
    on the test set), and the summary and metrics.json say so. Epoch 3 sees only NaN batches, so
    it cannot beat an earlier epoch: model.pt stays that epoch's while the run goes on."""
    one, tmp = launched[(ex, "one")], launched[(ex, "two")].output_dir.parent
    run = one.part(7)
    assert run.rc == 0, one
    m = run.metrics(tmp / "val")
    val = [e["val_accuracy"] for e in m["epochs"]]
    best = val.index(max(val)) + 1
    assert len(val) == 3 and best < 3 and m["epochs"][2]["skipped_steps"] > 0, m["epochs"]
    assert m["epochs"][0]["train_images"] == SPEC[ex]["train"] - VAL_SPLIT  # held out: not trained
    final = m["final"]
    assert final["selected_on"] == "val" and final["model_epoch"] == final["best_epoch"] == best
    assert f"model.pt: epoch {best}, the best on --val-split" in run.stdout, run
    saved = torch.load(tmp / "val" / "checkpoints" / f"epoch{best:04d}" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    model = torch.load(tmp / "val" / "model.pt", weights_only=True)
    assert saved.keys() == model.keys() and all(same(saved[k], model[k]) for k in saved)


def test_a_training_step_equals_plain_pytorch(launched):
    """Each example's own step (config handling, engine, loss, optimizer_step with its clipping) gives
    the weights a plain PyTorch loop with the same optimizer, clipping and schedule gives: exactly in
    fp32 (02's default config is clipped by the script, 03's ZeRO-2 by DeepSpeed), closely in bf16."""
    p, cases = launched[("parity",)]
    assert p.returncode == 0, p.stderr[-3000:]
    results = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases), p.stdout
    for r in results:
        assert r["moved"] > 0.1, r  # the steps really trained
        assert r["relative"] < (1e-6 if r["dtype"] == "fp32" else 0.25), r
    assert results[2]["clip"] == 1.0  # 02's default config: the script's own clipping was compared


@pytest.mark.parametrize("ex", ["02_cifar10", "03_cifar10_basic"])  # 01 shares 03's code
def test_deepspeed_config_errors_end_in_one_line(ex, tmp_path):
    """What only DeepSpeed checks (the constructors deepspeed.initialize calls: a negative warmup,
    betas of one number, an unknown optimizer or scheduler, a misspelt parameter; and
    DeepSpeedConfig: a batch size for one GPU on two) ends on both ranks in one line naming the
    config file (and section), exit code 2, no traceback from any rank: one 2-rank launch runs them
    all (tests/drive.py). 02 gets 03's config (Adam, WarmupLR), whose errors these are."""
    bad = {  # name: (edit, the section named, a word of the error)
        "scheduler": (lambda c: c["scheduler"]["params"].update(warmup_num_steps=-5),
                      "scheduler", "warmup_num_steps"),
        "optimizer": (lambda c: c["optimizer"]["params"].update(betas=[0.9]),
                      "optimizer", "IndexError"),
        "opt_type": (lambda c: c["optimizer"].update(type="Adamm"), "DeepSpeed's check", "Adamm"),
        "opt_param": (lambda c: c["optimizer"]["params"].update(lrr=0.1), "optimizer", "lrr"),
        "sched_type": (lambda c: c["scheduler"].update(type="WarmupLRR"), "scheduler", "WarmupLRR"),
        "one_gpu": (lambda c: c.update(train_batch_size=4), "AssertionError", "4 != 4 * 1 * 2"),
    }
    size = ["--synthetic-size", 64] if ex == "03_cifar10_basic" else []  # 02: a fixed size
    if ex == "02_cifar10":  # the checks are 03's word for word (test_repo's SHARED): one of each kind
        bad = {k: bad[k] for k in ("scheduler", "one_gpu")}
    runs = [["--dataset", "synthetic", *size, "--epochs", 1, "--output-dir", tmp_path / k,
             "--deepspeed_config", config("03_cifar10_basic", tmp_path / f"{k}.json", edit)]
            for k, (edit, _, _) in bad.items()]
    r = launch(ex, runs=runs, ranks=2, cwd=tmp_path, timeout=300, stall=90)
    assert "Traceback" not in r.text, r
    for k, (name, (_, section, needle)) in enumerate(bad.items()):
        part = r.part(k)
        assert part.rc == 2, (name, r)
        errors = [ln for ln in part.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and f"{name}.json: {section}" in errors[0], (name, r)
        assert needle in errors[0], (name, r)
        assert not (tmp_path / name).exists(), name  # a refused run leaves nothing behind
