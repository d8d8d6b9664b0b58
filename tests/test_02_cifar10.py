"""02_cifar10, run for real on the CPU (gloo) on small generated data. The machine running CI is small:
every run here uses a few hundred images and --max-steps or 1-3 epochs."""

import json
import pickle
import subprocess
import sys

import pytest
import torch
from harness import (
    CONTRACT_BAD_INPUT,
    REPO,
    assert_clean_error,
    contract_bad_input,
    load_example,
    make_cifar_pickles,
    make_imagefolder,
    offline_env,
    run_example,
    write_config,
)

EX = "02_cifar10"
SMALL = lambda c: c.update(train_micro_batch_size_per_gpu=16)  # noqa: E731 - more steps on tiny data


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data") / "imgs", n_train=192, n_test=60)


@pytest.fixture(scope="module")
def small_cfg(tmp_path_factory):
    return write_config(EX, tmp_path_factory.mktemp("cfg") / "small.json", SMALL)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, folder, small_cfg):
    out = tmp_path_factory.mktemp("two") / "run"
    return run_example(EX, ["--dataset", "imagefolder", "--data-dir", folder, "--deepspeed_config", small_cfg,
                            "--epochs", "3", "--warmup-epochs", "0.5", "--log-interval", "2"],
                       output_dir=out, ranks=2)


def test_two_ranks_imagefolder_learn_and_report(two_rank_run):
    r = two_rank_run
    assert r.rc == 0, r
    m = r.metrics
    assert m["world_size"] == 2 and m["example"] == EX and len(m["epochs"]) == 3
    assert m["final"]["test_accuracy"] >= 70.0, m["final"]  # 3 classes: chance is 33%
    assert set(m["final"]["per_class_accuracy"]) == {"a", "b", "c"}
    assert all(e["train_images"] == 192 for e in m["epochs"]), m["epochs"]  # 96 per rank, once per epoch
    for key in ("train_loss", "train_accuracy", "test_accuracy", "lr", "grad_norm", "skipped_steps",
                "epoch_time_s", "images_per_s"):
        assert key in m["epochs"][0]
    assert m["config"]["scheduler"]["params"]["total_num_steps"] == 3 * 6  # 96 per rank / 16
    assert "zero_optimization" not in m["config"] and "train_batch_size" not in m["config"]
    assert (r.output_dir / "curves.png").stat().st_size > 1000
    assert "per class" in r.stdout


def test_two_ranks_print_once(two_rank_run):
    r = two_rank_run
    assert r.stdout.count("DeepSpeed CNN training: 02_cifar10") == 1, r
    assert r.stdout.count("Training finished") == 1, r
    assert "Traceback" not in r.text


def test_model_pt_loads_without_deepspeed(two_rank_run):
    mod = load_example(EX)
    assert sum(p.numel() for p in mod.build_model().parameters()) == 268_746  # seed 002's model, 10 classes
    model = mod.CIFAR10CNNEnhanced(num_classes=3)
    model.load_state_dict(torch.load(two_rank_run.output_dir / "model.pt", weights_only=True))


def test_synthetic_two_ranks_max_steps(tmp_path):
    r = run_example(EX, ["--dataset", "synthetic", "--epochs", "2", "--warmup-epochs", "0.1", "--max-steps", "40",
                         "--log-interval", "20"],
                    output_dir=tmp_path / "o", ranks=2)
    assert r.rc == 0, r
    m = r.metrics
    assert m["final"]["epochs_completed"] == 1 and "Stopping at --max-steps 40" in r.stdout
    assert "5,000 train / 1,000 test" in r.stdout and "268,746 parameters" in r.stdout
    assert m["final"]["test_accuracy"] > 20.0, m["final"]  # chance is 10%


def test_augmentation_sharding_and_determinism():
    mod = load_example(EX)
    x = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(50)
    dev = torch.device("cpu")

    def epoch(rank, ep, augment=True):
        b = mod.AugmentedBatches(x, y, 8, rank, 2, dev, shuffle=True, seed=3, augment=augment)
        b.set_epoch(ep)
        return list(b)

    seen = [int(v) for rank in (0, 1) for _, lab in epoch(rank, 0) for v in lab]
    assert sorted(seen) == list(range(50))
    a, b = epoch(0, 1), epoch(0, 1)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))  # (seed, epoch, rank) fixes it
    assert not torch.equal(epoch(0, 2)[0][0], a[0][0])
    plain = epoch(0, 1, augment=False)
    assert plain[0][0].shape == (8, 3, 32, 32) and plain[0][0].dtype == torch.float32
    assert not torch.equal(plain[0][0], a[0][0])  # crops/flips changed the pixels
    mean = torch.tensor(mod.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(mod.STD).view(1, 3, 1, 1)
    ref = (x[plain[0][1]].float() / 255 - mean) / std
    assert torch.allclose(plain[0][0], ref, atol=1e-6)


def cifar_pickles_with_str_keys(root, **kw):
    """harness.make_cifar_pickles writes bytes keys (b"data"); the official files are Python 2 pickles that
    torchvision loads with encoding="latin1", giving str keys ("data", "labels", "label_names"), which is
    what it looks up. Rewrite the generated files that way."""
    root = make_cifar_pickles(root, **kw)
    for f in (root / "cifar-10-batches-py").iterdir():
        with open(f, "rb") as fh:
            d = pickle.load(fh)
        with open(f, "wb") as fh:
            pickle.dump({k.decode(): v for k, v in d.items()}, fh)
    return root


def test_cifar10_loader_reads_official_pickles(tmp_path, monkeypatch):
    import torchvision

    root = cifar_pickles_with_str_keys(tmp_path / "data", n_train=500, n_test=100)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)  # batches.meta md5
    mod = load_example(EX)
    x, y = mod.load_cifar10(str(root), True, download=True)  # "already downloaded": no network used
    assert x.shape == (500, 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.long and y.min() == 0 and y.max() == 9
    tx, ty = mod.load_cifar10(str(root), False, download=False)
    assert tx.shape == (100, 3, 32, 32) and len(ty) == 100


    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f)
    assert torch.equal(x[0].flatten(), torch.as_tensor(first["data"][0]))
    assert y[0] == first["labels"][0]


def test_cifar10_offline_without_files(tmp_path):
    r = run_example(EX, ["--data-dir", tmp_path / "empty"], output_dir=tmp_path / "o", launcher="python")
    assert_clean_error(r, "CIFAR-10", "cifar-10-python.tar.gz", "--dataset synthetic")
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_resume_continues_as_if_never_stopped(tmp_path, folder, small_cfg):
    common = ["--dataset", "imagefolder", "--data-dir", folder, "--deepspeed_config", small_cfg, "--epochs", "2",
              "--val-split", "32"]
    straight = run_example(EX, common, output_dir=tmp_path / "a", launcher="python")
    assert straight.rc == 0, straight
    # 160 training images / 16 = 10 steps = exactly one epoch at 1 rank: stop there, then resume
    first = run_example(EX, common + ["--max-steps", "10"], output_dir=tmp_path / "b", launcher="python")
    assert first.rc == 0 and len(first.metrics["epochs"]) == 1, first
    resumed = run_example(EX, common + ["--resume"], output_dir=tmp_path / "b", launcher="python")
    assert resumed.rc == 0, resumed
    assert "continuing at epoch 2" in resumed.stdout
    a, b = straight.metrics, resumed.metrics
    assert a["final"]["selected_on"] == "val" and "val_accuracy" in a["epochs"][0]
    assert [e["epoch"] for e in b["epochs"]] == [1, 2]
    for ea, eb in zip(a["epochs"], b["epochs"], strict=True):
        assert ea["train_loss"] == pytest.approx(eb["train_loss"], rel=1e-6)
    assert a["final"]["test_accuracy"] == pytest.approx(b["final"]["test_accuracy"], abs=1e-9)
    wa = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)


def test_bf16_autocast_trains_on_cpu(tmp_path, folder, small_cfg):
    r = run_example(EX, ["--dataset", "imagefolder", "--data-dir", folder, "--deepspeed_config", small_cfg,
                         "--epochs", "2", "--warmup-epochs", "0.5", "--dtype", "bf16", "--label-smoothing", "0.1",
                         "--tta-flip"], output_dir=tmp_path / "o", launcher="python")
    assert r.rc == 0, r
    m = r.metrics
    assert m["final"]["dtype"] == "bf16" and m["config"]["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in m["config"] and "fp16" not in m["config"]
    assert m["final"]["test_accuracy"] >= 60.0, m["final"]
    assert all(e["skipped_steps"] == 0 for e in m["epochs"])


def test_fp16_falls_back_on_cpu(tmp_path):
    r = run_example(EX, ["--dataset", "synthetic", "--epochs", "1", "--max-steps", "5", "--dtype", "fp16"],
                    output_dir=tmp_path / "o", launcher="python")
    assert r.rc == 0, r
    assert "notice: fp16 is not supported on the CPU" in r.stdout
    assert r.metrics["final"]["dtype"] == "fp32"


def test_fp16_config_maps_to_autocast_without_zero():
    mod = load_example(EX)
    args = mod.parse_args(["--dtype", "fp16"])
    cfg = mod.read_config(args.deepspeed_config, 1)
    cfg["zero_optimization"] = {"stage": 1}  # a user's ZeRO config: fp16 autocast must drop ZeRO
    cfg, dtype = mod.finalize_config(cfg, args, 10, False, lambda *a: None)  # as on a GPU
    assert dtype == "fp16" and cfg["torch_autocast"] == {"enabled": True, "dtype": "float16"}
    assert cfg["zero_optimization"]["stage"] == 0 and "fp16" not in cfg
    fast = mod.parse_args(["--deepspeed_config", str(REPO / EX / "ds_config_fast.json")])
    cfg, dtype = mod.finalize_config(mod.read_config(fast.deepspeed_config, 1), fast, 10, False, lambda *a: None)
    assert dtype == "fp32" and "torch_autocast" not in cfg and "zero_optimization" not in cfg


@pytest.mark.parametrize("case", CONTRACT_BAD_INPUT + ["missing_test_class", "not_an_image", "no_test_dir"])
def test_bad_input(tmp_path, case):
    args, needles = ["--dataset", "synthetic"], []
    if case in CONTRACT_BAD_INPUT:
        extra, needles = contract_bad_input(EX, case, tmp_path)
        args = args + extra
    else:
        root = make_imagefolder(tmp_path / "imgs", n_train=30, n_test=15)
        if case == "missing_test_class":
            for f in (root / "test" / "b").iterdir():
                f.unlink()
            (root / "test" / "b").rmdir()
            needles = ["class folders differ"]
        elif case == "not_an_image":
            (root / "train" / "a" / "notes.png").write_text("not a picture")
            needles = ["cannot read image", "notes.png"]
        else:
            import shutil

            shutil.rmtree(root / "test")
            needles = ["test is missing"]
        args = ["--dataset", "imagefolder", "--data-dir", root]
    out = tmp_path / "o"
    r = run_example(EX, args, output_dir=out, launcher="python")
    assert_clean_error(r, *needles)
    assert not (out / "metrics.json").exists() and not (out / "model.pt").exists()


@pytest.mark.parametrize("dtype,tol", [("auto", 1e-6), ("bf16", 0.25)])
def test_parity_with_plain_pytorch(dtype, tol):
    """The shipped config (fp32, no ZeRO, SGD + clipping) and bf16 autocast: a few DeepSpeed steps give the
    parameters a plain PyTorch SGD loop with the same schedule gives (the reference runs in fp32, so bf16
    is only close)."""
    p = subprocess.run([sys.executable, str(REPO / "tests" / "parity_check.py"), EX, "--dtype", dtype],
                       capture_output=True, text=True, env=offline_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["moved"] > 0.1, res  # the steps really trained
    assert res["relative"] < tol, res


def test_own_clipping_matches_deepspeeds(tmp_path):
    """fp32 without ZeRO: the script clips with the global norm it takes anyway for its non-finite check
    (DeepSpeed's own fp32 clipping is slow, see train_ds.py); under ZeRO-1 DeepSpeed clips. 30 steps with a
    tight clip: the same weights either way, far from a run with clipping off."""
    def run(name, stage, clip):
        cfg = write_config(EX, tmp_path / f"{name}.json",
                           lambda c: c.update(gradient_clipping=clip, zero_optimization={"stage": stage},
                                             zero_allow_untested_optimizer=True))  # torch SGD under ZeRO
        r = run_example(EX, ["--dataset", "synthetic", "--epochs", "1", "--max-steps", "30", "--deepspeed_config", cfg],
                        output_dir=tmp_path / name, launcher="python")
        assert r.rc == 0, r
        assert f"gradient clipping {clip:g} |" in r.stdout, r
        return torch.load(r.output_dir / "model.pt", weights_only=True)

    own, ds, off = run("own", 0, 0.05), run("ds", 1, 0.05), run("off", 0, 0.0)

    def dist(a, b):
        return max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())

    assert dist(own, ds) < 1e-5, dist(own, ds)
    assert dist(own, off) > 1e-2, dist(own, off)  # clipping really changed the updates
