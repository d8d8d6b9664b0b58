"""`--resume` continues the run the checkpoint holds (CONTRACT.md, "Training semantics"): flags not
given again come from the checkpoint; another dataset, data, seed or model is refused in one line
before DeepSpeed starts unless --allow-changes says the change is meant; and the final summary names
only files this run wrote. Per example one 1-rank `deepspeed` launch runs a sequence of trainings
(tests/drive.py); the refusals that need no training are checked in this process."""

import re
import shutil

import pytest
import torch
from harness import (
    EXAMPLES,
    ReachedDeepSpeed,
    assert_clean_error,
    built_once,
    in_process,
    launch,
    learnable_images,
    make_imagefolder,
    make_mnist_idx,
    write_config,
)

# Per example: a dataset other than the default one (so that leaving its flag out matters), a micro
# batch, its steps per epoch, and a dataset to switch to.
SPEC = {
    "01_basic_convnet": dict(dataset="mnist", micro=16, steps=10, other="synthetic"),
    "02_cifar10": dict(dataset="imagefolder", micro=8, steps=10, other="synthetic"),
    "03_cifar10_basic": dict(dataset="imagefolder", micro=8, steps=8, other="synthetic"),
}
RUNS = {"first": 0, "elsewhere": 1, "allowed": 2, "seed": 3, "dataset": 4, "continued": 5}


def make_data(example, root):
    if example == "01_basic_convnet":
        return make_mnist_idx(root / "mnist", 160, 64)
    return make_imagefolder(root / "imgs", n_train=SPEC[example]["steps"] * 8, n_test=30)


@pytest.fixture(scope="module")
def sequences(tmp_path_factory):
    """sequences(example) -> (launch result, tmp dir, first run's flags); built once per example."""
    return built_once(build, tmp_path_factory)


def build(example, tmp):
    s = SPEC[example]
    cfg = write_config(example, tmp / "c.json", lambda c: c.update(train_micro_batch_size_per_gpu=s["micro"]))
    flags = ["--dataset", s["dataset"], "--data-dir", make_data(example, tmp), "--deepspeed_config", cfg,
             "--seed", "5", "--log-interval", "3", "--epochs", "2"]
    if example != "03_cifar10_basic":  # 03 ships WarmupLR only: no schedule sized in epochs
        flags += ["--warmup-epochs", "1.5"]
    a = tmp / "a"
    runs = [
        flags + ["--max-steps", s["steps"], "--output-dir", a],  # epoch 1 of 2, then stops
        # epoch 2 all non-finite: every step skipped, so no epoch beats epoch 1 on test
        flags + ["--resume", a, "--output-dir", tmp / "b"],
        ["--resume", a, "--output-dir", tmp / "c", "--seed", "6", "--allow-changes"],
        ["--resume", "--output-dir", a, "--seed", "6"],
        ["--resume", "--output-dir", a, "--dataset", s["other"]],
        ["--resume", "--output-dir", a],  # everything else from the checkpoint
    ]
    nan = ",".join(f"{RUNS['elsewhere']}:0:2:{b}" for b in range(s["steps"]))
    if example == "03_cifar10_basic":  # its model.pt is the last epoch's: every epoch writes one
        nan = ""
    result = launch(example, runs=runs, drive=["--nan", nan], cwd=tmp, timeout=240)
    return result, tmp, flags


@pytest.mark.parametrize("example", EXAMPLES)
def test_another_seed_is_refused_in_one_line_unless_allowed(example, sequences):
    r, tmp, _ = sequences(example)
    refused = r.part(RUNS["seed"])
    assert_clean_error(refused.rc, refused.stderr, "seed 5", "6", "--allow-changes")
    assert refused.rc == 2 and "DeepSpeed CNN training" not in refused.stdout, refused
    allowed = r.part(RUNS["allowed"])
    assert allowed.rc == 0, allowed
    m = allowed.metrics(tmp / "c")
    assert m["args"]["seed"] == 6 and m["args"]["dataset"] == SPEC[example]["dataset"], m["args"]
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]


@pytest.mark.parametrize("example", EXAMPLES)
def test_another_dataset_is_refused_naming_it(example, sequences):
    r, _, _ = sequences(example)
    refused = r.part(RUNS["dataset"])
    assert_clean_error(refused.rc, refused.stderr, f"dataset {SPEC[example]['dataset']}",
                       SPEC[example]["other"], "--allow-changes")
    assert refused.rc == 2, refused


@pytest.mark.parametrize("example", EXAMPLES)
def test_flags_not_given_again_come_from_the_checkpoint(example, sequences):
    """The last run gives only --resume and --output-dir: it trains on the first run's dataset and
    data with its seed, log interval and epochs (but not its --max-steps, which was for that run)."""
    r, tmp, flags = sequences(example)
    first, continued = r.part(RUNS["first"]), r.part(RUNS["continued"])
    assert first.rc == 0 and continued.rc == 0, r
    assert "continuing at epoch 2" in continued.stdout, continued
    m = continued.metrics(tmp / "a")
    given = dict(zip(flags[::2], flags[1::2]))
    for flag, value in given.items():
        assert str(m["args"][flag[2:].replace("-", "_")]) == str(value), (flag, m["args"])
    assert m["args"]["max_steps"] == 0
    assert [e["epoch"] for e in m["epochs"]] == [1, 2] and m["final"]["epochs_completed"] == 2
    assert [e["train_images"] for e in m["epochs"]] == [m["epochs"][0]["train_images"]] * 2
    said = [ln for ln in continued.stdout.splitlines() if "from the checkpoint" in ln]
    assert len(said) == 1 and "dataset=" in said[0] and "log_interval=" in said[0], said
    steps = re.findall(r"^  step +(\d+) |^\[2, +(\d+)\]", continued.stdout, re.M)
    assert steps, continued.stdout  # the log interval of 3 (not the default 50 or 2000) was used


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_summary_names_only_files_this_run_wrote(example, sequences):
    """--resume A --output-dir B where no epoch beats A's best on test: model.pt is the last epoch's,
    never chosen on the test set, so B has one and the summary names it; every file the summary
    names exists in B."""
    r, tmp, _ = sequences(example)
    run, b = r.part(RUNS["elsewhere"]), tmp / "b"
    assert run.rc == 0, run
    m = run.metrics(b)
    saved = [ln for ln in run.stdout.splitlines() if ln.startswith("Saved: ")]
    assert len(saved) == 1, run.stdout
    names = re.split(r"[(;]", saved[0][len("Saved: "):])[0].split(",")
    paths = [b / n.strip().split("/")[-1] for n in names]
    assert (b / "model.pt").exists() and "model.pt" in [p.name for p in paths], saved[0]
    if example != "03_cifar10_basic":  # epoch 2 all skipped: the best epoch on test stays 1
        assert m["final"]["best_epoch"] == 1, m["final"]
        assert m["epochs"][1]["skipped_steps"] == SPEC[example]["steps"]
    if example == "02_cifar10":  # its final summary says which epoch model.pt holds
        assert m["final"]["model_epoch"] == 2, m["final"]
    assert paths and all(p.is_file() for p in paths), (saved[0], paths)


@pytest.mark.parametrize("example", EXAMPLES)
def test_changed_data_files_are_refused_naming_the_data(example, sequences, tmp_path):
    """The first run's data copied elsewhere is the same data (--data-dir may move); the copy with
    one image replaced (a PNG, or an image inside MNIST's IDX file) is not."""
    _, tmp, flags = sequences(example)
    data = flags[flags.index("--data-dir") + 1]
    same, changed = tmp_path / "same", tmp_path / "changed"
    shutil.copytree(data, same)
    shutil.copytree(data, changed)
    if example == "01_basic_convnet":
        idx = changed / "MNIST" / "raw" / "train-images-idx3-ubyte"
        blob = bytearray(idx.read_bytes())
        blob[16:16 + 784] = bytes(255 - v for v in blob[16:16 + 784])  # image 0, negated
        idx.write_bytes(bytes(blob))
    else:
        from PIL import Image

        png = sorted((changed / "train").rglob("*.png"))[3]
        other = learnable_images(1, 32, 3, 3, seed=99)[0][0]
        Image.fromarray(other.numpy()).save(png)
    resume = ["--resume", "--output-dir", tmp / "a", "--epochs", "3"]
    with pytest.raises(ReachedDeepSpeed):
        in_process(example, resume + ["--data-dir", same])
    rc, _, err = in_process(example, resume + ["--data-dir", changed])
    assert_clean_error(rc, err, "data", "--allow-changes")
    assert rc == 2


@pytest.mark.parametrize("example", EXAMPLES)
def test_a_flag_given_equal_to_its_default_is_given(example, sequences):
    """--seed 42 is the default, but given on the command line it is this run's seed: refused."""
    _, tmp, _ = sequences(example)
    rc, _, err = in_process(example, ["--resume", "--output-dir", tmp / "a", "--epochs", "3", "--seed", "42"])
    assert_clean_error(rc, err, "seed 5", "42")
    assert rc == 2


@pytest.mark.parametrize("example", EXAMPLES)
def test_a_checkpoint_without_its_runs_identity_is_refused(example, tmp_path):
    """A checkpoint written before checkpoints recorded their run: refused in one line saying so;
    --allow-changes resumes it with this command's flags."""
    d = tmp_path / "old" / "checkpoints" / "epoch0001"
    d.mkdir(parents=True)
    (d.parent / "latest").write_text("epoch0001")
    old = {"example": example, "run": {"epoch": 1}, "dp_world_size": 1,  # what resuming reads first
           "ds_config": {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}}
    torch.save(old, d / "mp_rank_00_model_states.pt")
    resume = ["--resume", tmp_path / "old", "--output-dir", tmp_path / "o", "--dataset", "synthetic"]
    rc, _, err = in_process(example, resume)
    assert_clean_error(rc, err, "--resume", "does not record", "an older script", "--allow-changes")
    assert rc == 2 and not (tmp_path / "o").exists()
    with pytest.raises(ReachedDeepSpeed):
        in_process(example, resume + ["--allow-changes"])
