"""In this process, no launcher: what every example does with the input a user gives it (flags, config,
output directory, checkpoints to resume, datasets, images to classify), its precision rule and
schedule, its data sharding, and how it writes files. Bad input must end in one or two plain lines
and a non-zero exit before anything slow starts, leaving nothing behind."""

import contextlib
import importlib.util
import io
import json
import os
import signal
import sys
from types import SimpleNamespace

import pytest
import torch
from harness import (
    EXAMPLES,
    REPO,
    assert_clean_error,
    gloo,
    in_process,
    load_example,
    make_cifar_pickles,
    make_imagefolder,
    make_mnist_idx,
    write_config,
)

CPU = torch.device("cpu")


# ============================================================================ bad input
def _cfg(edit):
    return lambda ex, t: ["--deepspeed_config", write_config(ex, t / "c.json", edit)]


def _text(text):
    def make(ex, t):
        (t / "c.json").write_text(text)
        return ["--deepspeed_config", t / "c.json"]
    return make


def _checkpoint(example, state, tmp, blob=None):
    """A --resume directory whose checkpoint file holds `state` (or raw bytes `blob`)."""
    d = tmp / "old" / "checkpoints" / "epoch0001"
    d.mkdir(parents=True)
    (d.parent / "latest").write_text("epoch0001")
    if blob is None:
        torch.save(state, d / "mp_rank_00_model_states.pt")
    else:
        (d / "mp_rank_00_model_states.pt").write_bytes(blob)
    return ["--resume", tmp / "old"]


def _held_run(ex, t):
    out = t / "o"
    (out / "checkpoints" / "epoch0003").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("epoch0003")
    (out / "metrics.json").write_text('{"final": {"test_accuracy": 97.5}}')
    (out / "model.pt").write_bytes(b"weights of yesterday")
    return []


BAD = {  # case: (flags from (example, tmp dir), words the message must hold)
    "config_malformed": (_text('{"train_micro_batch_size_per_gpu": 4,,}'), ["not valid JSON"]),
    "config_empty": (_text(""), ["not valid JSON"]),
    "config_missing": (lambda ex, t: ["--deepspeed_config", t / "nope.json"], ["not found"]),
    "config_not_an_object": (_text("[32]"), ["JSON object"]),
    "config_unknown_key": (_cfg(lambda c: c.update(train_micro_batch_size=8)),
                           ["unknown key", "train_micro_batch_size"]),
    "config_section_wrong_type": (_cfg(lambda c: c.update(optimizer="Adam")),
                                  ['optimizer = "Adam"', "JSON object"]),
    "config_clipping_a_string": (_cfg(lambda c: c.update(gradient_clipping="1.0")),
                                 ['gradient_clipping = "1.0"', "number"]),
    "config_lr_a_string": (_cfg(lambda c: c["optimizer"]["params"].update(lr="0.1")),
                           ['optimizer.params.lr = "0.1"', "number"]),
    "config_no_optimizer": (_cfg(lambda c: c.pop("optimizer")), ["optimizer", "null"]),
    "config_unknown_scheduler": (_cfg(lambda c: c["scheduler"].update(type="WarmupLRR")),
                                 ['scheduler.type = "WarmupLRR"', "WarmupCosineLR"]),
    "config_optimizer_param_misspelt": (_cfg(lambda c: c["optimizer"]["params"].update(lrr=0.1)),
                                        ["optimizer.params.lrr", "takes no such parameter", "lr, "]),
    "config_scheduler_param_misspelt": (
        _cfg(lambda c: c["scheduler"]["params"].update(warmup_num_step=5)),
        ["scheduler.params.warmup_num_step", "takes no such parameter", "warmup_num_steps"]),
    "config_unknown_optimizer": (_cfg(lambda c: c["optimizer"].update(type="Adamm")), ["Adamm"]),
    "config_micro_batch_0": (_cfg(lambda c: c.update(train_micro_batch_size_per_gpu=0)),
                             ["train_micro_batch_size_per_gpu = 0", "positive integer"]),
    "config_two_precisions": (_cfg(lambda c: c.update(fp16={"enabled": True}, bf16={"enabled": True})),
                              ["fp16.enabled and bf16.enabled", "one of them"]),
    "config_torch_autocast": (_cfg(lambda c: c.update(torch_autocast={"enabled": True})),
                              ["torch_autocast.enabled", "bf16 or fp16"]),
    "config_tensorboard_not_installed": (_cfg(lambda c: c.update(tensorboard={"enabled": True})),  # not locked
                                         ["tensorboard.enabled", "pip install tensorboard"]),
    "epochs_0": (lambda ex, t: ["--epochs", "0"], ["--epochs", "at least 1"]),
    "epochs_negative": (lambda ex, t: ["--epochs", "-3"], ["--epochs", "at least 1"]),
    "epochs_not_a_number": (lambda ex, t: ["--epochs", "ten"], ["--epochs", "invalid int value"]),
    "patience_0": (lambda ex, t: ["--patience", "0"], ["--patience"]),
    "dtype_unknown": (lambda ex, t: ["--dtype", "fp8"], ["--dtype", "invalid choice"]),
    "resume_nothing": (lambda ex, t: (t / "empty").mkdir() or ["--resume", t / "empty"],
                       ["--resume", "no checkpoint"]),
    "resume_truncated": (lambda ex, t: _checkpoint(ex, None, t, blob=b"PK\x03\x04 cut short"),
                         ["--resume", "cannot load"]),
    "resume_other_example": (lambda ex, t: _checkpoint(ex, {"example": "another"}, t),
                             ["--resume", "not a checkpoint of"]),
    "resume_finished": (lambda ex, t: _checkpoint(ex, {"example": ex, "run": {"epoch": 2}}, t)
                        + ["--epochs", "2", "--allow-changes"],
                        ["--resume", "all 2 epochs", "raise --epochs"]),
    "resume_sgd_zero_on_another_count": (  # a 2-rank ZeRO-2 checkpoint of SGD, on 1 rank
        lambda ex, t: _checkpoint(ex, {"example": ex, "run": {"epoch": 1}, "dp_world_size": 2,
                                       "ds_config": {"train_micro_batch_size_per_gpu": 4,
                                                     "optimizer": {"type": "SGD"},
                                                     "zero_optimization": {"stage": 2}}}, t)
        + ["--allow-changes"],
        ["ds_to_universal", "SGD", "ZeRO stage 2", "2 ranks", "Adam"]),
    "resume_and_overwrite": (lambda ex, t: ["--resume", "--overwrite"], ["--overwrite"]),
    "output_dir_under_a_file": (lambda ex, t: (t / "f").write_text("x") and ["--output-dir", t / "f" / "o"],
                                ["cannot write", "--output-dir"]),
    "output_dir_holds_a_run": (_held_run, ["already holds a run", "--resume", "--overwrite"]),
}


# What 01 and 03 do not refuse here: 02 refuses misspelt keys and has monitors; and 01 and 03 leave
# every other config check to DeepSpeed, after the process group is up (a key's type, ZeRO stage,
# batch sizes: test_config_is_checked_by_deepspeed below) or in deepspeed.initialize (optimizer
# and scheduler: test_examples.py::test_deepspeed_config_errors_end_in_one_line).
# DeepSpeed does not check a string for gradient_clipping or an enabled torch_autocast section.
# 03 has no early stopping (--patience); 01 keeps it.
NOT_IN_03 = {"config_unknown_key", "config_tensorboard_not_installed", "config_clipping_a_string", "config_lr_a_string",
             "config_unknown_scheduler", "config_optimizer_param_misspelt",
             "config_scheduler_param_misspelt", "config_unknown_optimizer", "config_micro_batch_0",
             "config_torch_autocast", "patience_0"}


# 02 checks what DeepSpeed lets through and what it reads before DeepSpeed starts; the rest as 01.
NOT_IN_02 = {"config_lr_a_string", "config_unknown_scheduler",
             "config_optimizer_param_misspelt", "config_scheduler_param_misspelt",
             "config_unknown_optimizer"}
NOT_HERE = {"01_basic_convnet": NOT_IN_03 - {"patience_0"}, "02_cifar10": NOT_IN_02,
            "03_cifar10_basic": NOT_IN_03}


@pytest.mark.parametrize("example,case", [(ex, case) for case in BAD for ex in EXAMPLES
                                          if case not in NOT_HERE.get(ex, ())])
def test_bad_input_is_refused_before_deepspeed_starts(example, case, tmp_path, monkeypatch):
    flags, needles = BAD[case]
    args = [str(a) for a in flags(example, tmp_path)]
    out = tmp_path / "o"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else {}
    rc, _, err = in_process(example, args + ([] if "--output-dir" in args else ["--output-dir", out]))
    assert_clean_error(rc, err, *needles)
    assert rc == 2
    if before:  # what was there is there, byte for byte
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    else:
        assert not out.exists(), "a refused run left an output directory behind"


DEEPSPEED_CHECKS = {  # case: (edit, words 03's one line must hold), as DeepSpeedConfig words it
    "section_wrong_type": (lambda c: c.update(scheduler="WarmupLR"), ["c.json", "Error"]),
    "zero_stage_a_word": (lambda c: c.update(zero_optimization={"stage": "two"}),
                          ["c.json", "stage", "'two'", "0, 1, 2, 3"]),
    "micro_batch_0": (lambda c: c.update(train_micro_batch_size_per_gpu=0),
                      ["c.json", "greater than 0"]),
    "batch_for_another_world": (lambda c: c.update(train_batch_size=7), ["c.json", "7 != {micro} * 1 * 1"]),
}


@pytest.mark.parametrize("example,case", [  # 02 refuses the others earlier (BAD above)
    (ex, case) for ex in EXAMPLES for case in DEEPSPEED_CHECKS
    if ex != "02_cifar10" or case in ("zero_stage_a_word", "batch_for_another_world")])
def test_config_is_checked_by_deepspeed(example, case, tmp_path):
    """Every rung builds DeepSpeed's own DeepSpeedConfig once the process group is up (it checks
    batch sizes against the real world size): its error becomes one line naming the file."""
    edit, needles = DEEPSPEED_CHECKS[case]
    mod = load_example(example)
    micro = json.loads((REPO / example / "ds_config.json").read_text())["train_micro_batch_size_per_gpu"]
    path = write_config(example, tmp_path / "c.json", edit)
    args = mod.parse_args(["--deepspeed_config", str(path)])
    cfg = mod.load_config(args, on_cpu=True)[0]
    with gloo(), pytest.raises(mod.UsageError) as e:
        mod.check_with_deepspeed(cfg, str(path))
    assert_clean_error(2, f"error: {e.value}", *[n.format(micro=micro) for n in needles])
    with gloo():
        checked = mod.check_with_deepspeed(mod.load_config(mod.parse_args([]), True)[0], "x")
    assert checked.train_batch_size == micro


def test_an_error_without_a_message_is_reported_in_one_line():
    mod = load_example("02_cifar10")
    assert mod.first_line(AssertionError()) == "AssertionError"
    assert mod.first_line(ValueError("\n\n")) == "ValueError"
    assert mod.first_line(OSError("disk full\nmore")) == "OSError: disk full"


# ============================================================================ precision and schedule
def resolve(example, config, dtype, on_cpu):
    """(config, dtype, clip by the script or None); 03 always leaves clipping to DeepSpeed."""
    mod = load_example(example)
    args = mod.parse_args(["--deepspeed_config", str(REPO / example / config), "--dtype", dtype])
    cfg, got, *clip = mod.load_config(args, on_cpu)  # 02 also says who clips
    return cfg, got, clip[0] if clip else None


RULE = [  # example, config, --dtype, on a CPU, -> sections kept, ZeRO stage, clip by the script
    ("01_basic_convnet", "ds_config.json", "auto", False, {"fp16"}, 1, None),
    ("01_basic_convnet", "ds_config.json", "auto", True, set(), 1, None),  # fp16 -> fp32 notice
    ("01_basic_convnet", "ds_config.json", "bf16", False, {"bf16"}, 1, None),
    ("02_cifar10", "ds_config.json", "auto", False, set(), 0, 1.0),
    ("02_cifar10", "ds_config.json", "bf16", True, {"bf16"}, 0, None),
    ("02_cifar10", "ds_config_fast.json", "auto", False, set(), 0, 0.0),
    ("03_cifar10_basic", "ds_config.json", "auto", False, set(), 0, None),
    ("03_cifar10_basic", "ds_config_fp16.json", "auto", False, {"fp16"}, 1, None),
    ("03_cifar10_basic", "ds_config_zero2.json", "fp32", False, set(), 2, None),
]


@pytest.mark.parametrize("example,config,dtype,on_cpu,sections,stage,own_clip", RULE)
def test_one_precision_rule(example, config, dtype, on_cpu, sections, stage, own_clip):
    """DeepSpeed's own fp16/bf16 section or fp32; bf16 with check_grad_overflow (so DeepSpeed skips
    non-finite steps at every ZeRO stage); the script clips (and checks) only in fp32 without ZeRO,
    and then DeepSpeed's clipping is off in the config it gets."""
    cfg, got, clip = resolve(example, config, dtype, on_cpu)
    assert {k for k in ("fp16", "bf16") if cfg.get(k, {}).get("enabled")} == sections
    assert cfg.get("zero_optimization", {}).get("stage", 0) == stage and clip == own_clip
    if "bf16" in sections:
        assert cfg["bf16"]["check_grad_overflow"] is True
    if own_clip is not None:
        assert cfg["gradient_clipping"] == 0.0
    else:  # DeepSpeed clips, as the file says
        file = json.loads((REPO / example / config).read_text())
        assert cfg.get("gradient_clipping") == file.get("gradient_clipping")
    if example == "02_cifar10" and sections:  # BatchNorm buffers follow the parameters' dtype
        assert cfg["data_types"]["buffer_dtype"] == got


@pytest.mark.parametrize("example,config", [("01_basic_convnet", "ds_config.json"),
                                            ("02_cifar10", "ds_config.json"),
                                            ("03_cifar10_basic", "ds_config.json")])
def test_fp16_without_zero_is_refused_with_the_fix(example, config, tmp_path):
    cfg = write_config(example, tmp_path / "c.json", lambda c: c.pop("zero_optimization", None))
    mod = load_example(example)
    args = mod.parse_args(["--deepspeed_config", str(cfg), "--dtype", "fp16"])
    with pytest.raises(mod.UsageError, match="fp16 needs zero_optimization.stage >= 1"):
        mod.load_config(args, on_cpu=False)


@pytest.mark.parametrize("example", ["01_basic_convnet", "02_cifar10"])  # 03: WarmupLR only
def test_schedule_is_sized_for_the_world(example):
    """WarmupCosineLR's step counts come from the epochs and this world's steps per epoch."""
    mod = load_example(example)
    cfg = {"scheduler": {"type": "WarmupCosineLR", "params": {}}}
    args = mod.parse_args(["--epochs", "10", "--warmup-epochs", "2"])
    for steps in (313, 157):  # one rank, two ranks
        mod.fill_schedule(cfg, args, steps)
        assert cfg["scheduler"]["params"] == {"total_num_steps": 10 * steps, "warmup_num_steps": 2 * steps}


# ============================================================================ data
def shards(example, args, world, epoch):
    """Labels of every rank's training batches in one epoch, and the batch counts."""
    mod = load_example(example)
    cfg = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1}
    seen = []
    for rank in range(world):
        data = mod.load_data(mod.parse_args(args), cfg, "fp32", rank, world, CPU)
        seen.append([b for b in mod.train_batches(data, epoch)])
    return seen


@pytest.mark.parametrize("example", ["02_cifar10"])  # 01 and 03: DeepSpeed's loader (below)
def test_every_rank_trains_on_its_own_shard(example):
    """Through the functions main() calls: each image once per epoch over two ranks, the same number
    of steps on each, a new order every epoch. Images are told apart by their pixels."""
    args = ["--dataset", "synthetic"]
    counts = {}
    for epoch in (0, 1):
        seen = shards(example, args, 2, epoch)
        assert len(seen[0]) == len(seen[1])
        keys = [tuple(x[i].flatten()[:64].tolist()) for rank in seen for x, _ in rank for i in range(len(x))]
        counts[epoch] = keys
        if example == "01_basic_convnet":  # no augmentation: every image exactly once
            assert len(set(keys)) == len(keys), "an image was seen twice in one epoch"
    one = [tuple(y.tolist()) for x, y in shards(example, args, 1, 0)[0]]
    again = [tuple(y.tolist()) for x, y in shards(example, args, 1, 1)[0]]
    assert one != again, "the same order every epoch"
    labels = sorted(int(v) for rank in shards(example, args, 2, 0) for _, y in rank for v in y)
    assert labels == sorted(int(v) for _, y in shards(example, args, 1, 0)[0] for v in y)


def test_augmentation_is_the_same_at_any_world_size():
    """02 draws each crop and flip for a place in the epoch's permutation: one rank, or two ranks
    taking every other place, see identical images (so a resumed or rescaled run does too)."""
    one = shards("02_cifar10", ["--dataset", "synthetic"], 1, 3)[0]
    two = shards("02_cifar10", ["--dataset", "synthetic"], 2, 3)
    a = torch.cat([x for x, _ in one])
    b = torch.stack([torch.cat([x for x, _ in two[r]]) for r in (0, 1)], 1).flatten(0, 1)
    assert torch.equal(a[: len(b)], b)
    plain = load_example("02_cifar10").normalize(load_example("02_cifar10").synthetic(5000, 42, 1)[0])
    assert not torch.equal(a[:100], plain[:100]), "no augmentation at all"


def test_deepspeed_loader_reshuffles_every_epoch():
    """01's and 03's idiom on DeepSpeed's own loader class: set_epoch gives each epoch a new order
    and the ranks' shards cover the data once; without it (DeepSpeed never calls it) the order
    repeats."""
    from deepspeed.runtime.dataloader import DeepSpeedDataLoader
    from torch.utils.data import TensorDataset

    ds = TensorDataset(torch.arange(100).float(), torch.arange(100))

    def order(ld, epoch=None):
        if epoch is not None:
            ld.data_sampler.set_epoch(epoch)
        return [int(v) for _, lab in ld for v in lab]

    lds = [DeepSpeedDataLoader(ds, batch_size=10, pin_memory=False, local_rank=0, tput_timer=None,
                               num_local_io_workers=0, data_parallel_world_size=2,
                               data_parallel_rank=r) for r in (0, 1)]
    assert order(lds[0]) == order(lds[0])
    for epoch in (0, 1):
        assert sorted(order(lds[0], epoch) + order(lds[1], epoch)) == list(range(100))
    assert order(lds[0], 0) != order(lds[0], 1)
    for example in ("01_basic_convnet", "03_cifar10_basic"):
        src = (REPO / example / "train_ds.py").read_text()
        assert "data.loader.data_sampler.set_epoch(epoch)" in src and "training_data=data.trainset" in src


def load(example, args):
    mod = load_example(example)
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1}
    with gloo():
        if example != "02_cifar10":  # 01, 03: the batch sizes as DeepSpeed checked them
            checked = SimpleNamespace(train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=1)
            return mod.load_data(mod.parse_args([str(a) for a in args]), checked, CPU, torch.float32)
        return mod.load_data(mod.parse_args([str(a) for a in args]), cfg, "fp32", 0, 1, CPU)


def refused(example, args, *needles):
    mod = load_example(example)
    with pytest.raises(mod.UsageError) as e:
        load(example, args)
    assert_clean_error(2, f"error: {e.value}", *needles)


@pytest.mark.parametrize("example", ["02_cifar10", "03_cifar10_basic"])
def test_imagefolder_is_checked_image_by_image(example, tmp_path):
    root = make_imagefolder(tmp_path / "imgs", n_train=30, n_test=12)
    data = load(example, ["--dataset", "imagefolder", "--data-dir", root])
    assert data.classes == ["a", "b", "c"]
    jpeg = root / "train" / "a" / "cut.jpg"  # a JPEG whose header is fine and whose body is cut
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    refused(example, ["--dataset", "imagefolder", "--data-dir", root], "cannot read image", "cut.jpg")
    jpeg.write_text("not a picture")
    refused(example, ["--dataset", "imagefolder", "--data-dir", root], "cannot read image", "cut.jpg")
    jpeg.unlink()
    for f in (root / "test" / "b").iterdir():
        f.unlink()
    empty = "classes b" if example == "03_cifar10_basic" else "test/b"  # 03: torchvision's words
    refused(example, ["--dataset", "imagefolder", "--data-dir", root], "no images", empty)
    (root / "test" / "b").rmdir()
    refused(example, ["--dataset", "imagefolder", "--data-dir", root], "class folders differ")
    refused(example, ["--dataset", "imagefolder", "--data-dir", tmp_path / "nothing"], "no images")


def test_mnist_files_are_checked(tmp_path):
    """torchvision checks each IDX file's header against its size; 01 checks labels 0-9, one per
    image."""
    raw = make_mnist_idx(tmp_path / "d", 64, 32) / "MNIST" / "raw"
    args = ["--dataset", "mnist", "--data-dir", tmp_path / "d"]
    assert len(load("01_basic_convnet", args).trainset) == 64
    images, labels = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    good_images, good_labels = images.read_bytes(), labels.read_bytes()
    images.write_bytes(good_images[:5000])  # a fine header, a cut body
    refused("01_basic_convnet", args, "MNIST in", "corrupted", "--dataset synthetic")
    images.write_bytes(good_images)
    labels.write_bytes(good_labels[:8] + bytes([12]) + good_labels[9:])  # a label of 12
    refused("01_basic_convnet", args, "corrupted", "up to 12")
    labels.write_bytes(b"\x00\x00\x08\x01" + (60).to_bytes(4, "big") + good_labels[8:68])
    refused("01_basic_convnet", args, "64 images", "60 labels")  # the two files disagree


@pytest.mark.parametrize("example", ["02_cifar10", "03_cifar10_basic"])
def test_cifar10_loader_reads_the_official_files(example, tmp_path, monkeypatch):
    import torchvision

    root = make_cifar_pickles(tmp_path / "data", n_train=50, n_test=10)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    data = load(example, ["--dataset", "cifar10", "--data-dir", root])
    test = data.test.dataset if example == "03_cifar10_basic" else data.test.labels
    assert len(test) == 10 and data.classes[0] == "airplane"


@pytest.mark.parametrize("example,dataset,partial,hint", [
    ("01_basic_convnet", "mnist", "MNIST/raw/train-images-idx3-ubyte.gz", "ossci-datasets"),
    ("02_cifar10", "cifar10", "cifar-10-python.tar.gz", "cifar-10-python.tar.gz"),
    ("03_cifar10_basic", "cifar10", "cifar-10-python.tar.gz", "cifar-10-python.tar.gz")])
def test_offline_without_data_after_a_half_download(example, dataset, partial, hint, tmp_path):
    """No network (a dead proxy), and only what an interrupted download leaves: the message gives
    the manual download and --dataset synthetic, and no half-extracted dataset appears."""
    for k, v in {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}.items():
        os.environ[k] = v
    (tmp_path / partial).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / partial).write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(4000))
    try:
        refused(example, ["--dataset", dataset, "--data-dir", tmp_path], hint, "--dataset synthetic")
    finally:
        for k in ("http_proxy", "https_proxy"):
            os.environ.pop(k)
    assert not (tmp_path / "cifar-10-batches-py").exists()
    assert not (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()


# ============================================================================ files
def test_a_failed_write_leaves_the_previous_file(tmp_path):
    mod = load_example("02_cifar10")
    path = tmp_path / "metrics.json"
    path.write_text("previous")

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(mod.UsageError, match="disk full"):
        mod.atomic_write(str(path), half_then_fail)
    assert path.read_text() == "previous" and os.listdir(tmp_path) == ["metrics.json"]


@pytest.mark.parametrize("example", EXAMPLES)
def test_overwrite_sets_the_old_run_aside_and_a_failure_puts_it_back(example, tmp_path, monkeypatch):
    """--overwrite moves the old run's files (and its monitor/ csv files, which would otherwise get
    the new run's rows appended) out of the way before anything is written; files that are not the
    run's stay. A new run that fails before its first checkpoint (here DeepSpeed failing to start)
    puts the old run back byte for byte."""
    mod, out = load_example(example), tmp_path / "o"
    monitor = ["monitor/job/Train_lr.csv"] if "monitor" in mod.RUN_FILES else []  # 03: no monitors
    for f in ("checkpoints/epoch0001/x.pt", "checkpoints/latest", *monitor, "metrics.json",
              "model.pt", "curves.png", "notes.txt"):
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text(f"old {f}")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    seen = []

    def deepspeed_fails():
        seen.extend(sorted(p.name for p in out.iterdir() if not p.name.startswith(".")))
        raise RuntimeError("DeepSpeed failed to start")

    monkeypatch.setattr(mod, "setup_distributed", deepspeed_fails)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="failed to start"):
        mod.run(["--output-dir", str(out), "--overwrite"])
    signal.signal(signal.SIGTERM, handler)
    assert seen == ["notes.txt"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("example", EXAMPLES)
def test_files_are_replaced_whole_never_written_in_place(example, tmp_path, monkeypatch):
    """metrics.json and the `latest` pointer: a write that fails half-way (a full disk) leaves the
    previous file as it was, and a checkpoint that fails half-way leaves `latest` naming the
    previous epoch, so --resume never meets a half-written one."""
    mod = load_example(example)
    args = mod.parse_args(["--output-dir", str(tmp_path)])
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("epoch0001")
    (tmp_path / "metrics.json").write_text("previous")
    run = mod.RunState(epoch=2, best_epoch=1)

    class Engine:
        module = torch.nn.Linear(1, 1)  # 03 writes model.pt every epoch

        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            assert save_latest is False, "DeepSpeed's own `latest` is written in place"
            os.makedirs(f"{save_dir}/{tag}")
            with open(f"{save_dir}/{tag}/mp_rank_00_model_states.pt", "wb") as f:
                f.write(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc] file write failed")

    real_open = open

    def full_disk_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode:
            def write(text):
                real_write(text[: len(text) // 2])
                raise OSError(28, "No space left on device")
            real_write, f.write = f.write, write
        return f

    with gloo():
        own_clip = [None] if example == "02_cifar10" else []  # 01, 03: DeepSpeed clips
        no_model_pt = [False] if example == "02_cifar10" else []  # 01, 03 write it every epoch
        with pytest.raises(mod.UsageError, match="cannot write checkpoint"):
            mod.save_epoch(Engine(), run, args, {}, *own_clip, *no_model_pt)
        monkeypatch.setattr("builtins.open", full_disk_open)
        with pytest.raises(mod.UsageError, match="disk full"):
            mod.write_metrics(args, {}, *own_clip, run)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "epoch0001"
    assert (tmp_path / "metrics.json").read_text() == "previous"


# ============================================================================ the loop's state
def test_03_run_state_keeps_the_best_epoch():
    """03 has no early stopping: its RunState counts epochs and skipped steps and keeps the best."""
    mod = load_example("03_cifar10_basic")
    run = mod.RunState()
    for epoch, acc in enumerate([50, 60, 55], 1):
        run.record({"epoch": epoch, "test_accuracy": acc, "skipped_steps": epoch % 2})
    assert (run.epoch, run.best_epoch, run.best_accuracy, run.skipped_steps) == (3, 2, 60, 2)
    assert mod.RunState(**json.loads(json.dumps({**vars(run), "rng": {}}))).history == run.history


@pytest.mark.parametrize("example", ["01_basic_convnet", "02_cifar10"])  # 03: no early stopping
def test_run_state_keeps_best_and_patience(example):
    mod = load_example(example)
    args = mod.parse_args(["--epochs", "6", "--patience", "2", "--min-improvement", "0.1"])
    run, best = mod.RunState(), []
    for epoch, (loss, acc) in enumerate([(2.0, 50), (1.5, 60), (1.45, 55), (1.42, 58)], 1):
        best.append(run.record({"epoch": epoch, "train_loss": loss, "skipped_steps": epoch % 2}, acc, args))
    assert best == [True, True, False, False] and (run.best_epoch, run.best_accuracy) == (2, 60)
    assert run.patience_used == 2 and run.skipped_steps == 2 and run.best_loss == 1.42
    assert "Early stopping" in run.stop_reason(args, steps=100)
    run.epoch = 6  # the last epoch: a run that simply ends is not stopped early
    assert run.stop_reason(args, steps=100) is None
    assert mod.RunState(**json.loads(json.dumps({**vars(run), "rng": {}}))).history == run.history


def test_01_flags_a_loss_plateau():
    """01's plateau: the newest epoch is on one when each of the last --plateau-epochs epochs kept
    the train loss within 1% of the loss of the epoch before them; a notice, not a stop."""
    mod = load_example("01_basic_convnet")
    losses = [2.0, 1.0, 0.995, 1.004, 0.992, 0.97, 0.5]
    history = []
    flagged = []
    for epoch, loss in enumerate(losses, 1):
        history.append({"epoch": epoch, "train_loss": loss})
        flagged.append(mod.on_plateau(history, 3))
    # epoch 5: 0.995, 1.004, 0.992 all within 1% of epoch 2's 1.0; epoch 6: 0.97 is not of 0.995
    assert flagged == [False, False, False, False, True, False, False]
    assert not mod.on_plateau(history[:5], 0)  # --plateau-epochs 0: off
    assert mod.on_plateau([{"train_loss": 1.0}] * 3, 2) and not mod.on_plateau([{"train_loss": 1.0}] * 2, 2)


@pytest.mark.parametrize("seed", [1, 2, 42])
def test_01_starts_near_chance_loss(seed):
    """Before the first step the model should be unsure, not confident and wrong: over its first ten
    micro-batches the loss is near ln 10 = 2.30 (it was 19-57 with unscaled inputs and a Kaiming
    output layer)."""
    mod = load_example("01_basic_convnet")
    torch.manual_seed(seed)  # as main() does before it builds the model
    images, labels = mod.synthetic_digits(320, seed, 1).tensors
    model = mod.CNNModelEnhanced()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(images), labels).item()
    assert 2.0 < loss <= 2.6, loss


# ============================================================================ predict.py
def predictor(example):
    spec = importlib.util.spec_from_file_location(f"predict_{example}", REPO / example / "predict.py")
    mod = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("train_ds")
    sys.modules["train_ds"] = load_example(example)  # what `from train_ds import ...` finds
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop("train_ds") if saved is None else sys.modules.update(train_ds=saved)
    return mod


def predict(example, argv):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = predictor(example).main([str(a) for a in argv])
        except SystemExit as e:
            code, msg = e.code, e.code
            if isinstance(msg, str):
                print(msg, file=sys.stderr)
                code = 1
    return code, out.getvalue(), err.getvalue()


MODELS = {"01_basic_convnet": "CNNModelEnhanced", "02_cifar10": "CIFAR10CNNEnhanced",
          "03_cifar10_basic": "Net"}


@pytest.mark.parametrize("example", EXAMPLES)
def test_predict_prints_the_top_three_and_refuses_bad_input(example, tmp_path):
    mod = load_example(example)
    torch.manual_seed(0)
    torch.save(getattr(mod, MODELS[example])().state_dict(), tmp_path / "model.pt")
    other = EXAMPLES[(EXAMPLES.index(example) + 1) % 3]
    torch.save(getattr(load_example(other), MODELS[other])().state_dict(), tmp_path / "other.pt")
    images = make_imagefolder(tmp_path / "imgs", n_train=4, n_test=2) / "train" / "a"
    code, out, _ = predict(example, ["--model", tmp_path / "model.pt", images,
                                     images / sorted(os.listdir(images))[0]])
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == len(os.listdir(images)) + 1, out
    for line in lines:
        classes = [part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", ")]
        probs = [float(p.rstrip("%")) for _, p in classes]
        assert len(classes) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 100.1
    (tmp_path / "notes.png").write_text("not a picture")
    for argv, needle in [
        (["--model", tmp_path / "missing.pt", images], "no model at"),
        (["--model", tmp_path / "other.pt", images], f"no {example} model"),
        (["--model", tmp_path / "notes.png", images], "is not a model.pt"),
        (["--model", tmp_path / "model.pt", tmp_path / "nope.png"], "no such image"),
        (["--model", tmp_path / "model.pt", tmp_path / "notes.png"], "not an image"),
    ]:
        code, out, err = predict(example, argv)
        assert_clean_error(code, err, needle)
        assert out == ""


@pytest.mark.parametrize("example", EXAMPLES)
def test_predict_reads_the_class_names_from_model_pt_alone(example, tmp_path):
    """model.pt as train_ds.py writes it (plain_weights) carries the class names: a 10-class
    imagefolder model with no metrics.json beside it prints its own names. A model.pt without
    names (an older one) and an empty folder are each refused in one line."""
    mod = load_example(example)
    model = getattr(mod, MODELS[example])()
    names = [f"kind{k}" for k in range(10)]
    model.classes = names  # what main() sets from the dataset
    state = mod.plain_weights(type("Engine", (), {"module": model})())
    torch.save(state, tmp_path / "model.pt")
    images = make_imagefolder(tmp_path / "imgs", n_train=4, n_test=2) / "train" / "a"
    code, out, err = predict(example, ["--model", tmp_path / "model.pt", images])
    assert code == 0, err
    printed = {part.rsplit(" ", 1)[0] for line in out.splitlines()
               for part in line.split(": ", 1)[1].split(", ")}
    assert printed and printed <= set(names), out
    assert torch.load(tmp_path / "model.pt", weights_only=True).keys() == state.keys()
    getattr(mod, MODELS[example])().load_state_dict(torch.load(tmp_path / "model.pt",
                                                               weights_only=True))
    torch.save({k: v for k, v in state.items() if k != "_extra_state"}, tmp_path / "old.pt")
    (tmp_path / "empty").mkdir()
    for argv, needle in [(["--model", tmp_path / "old.pt", images], "class names"),
                         (["--model", tmp_path / "model.pt", tmp_path / "empty"], "no images")]:
        code, out, err = predict(example, argv)
        assert_clean_error(code, err, needle)
        assert out == ""
