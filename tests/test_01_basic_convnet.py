"""01_basic_convnet, run for real on the CPU through the deepspeed launcher, torchrun and plain python."""

import json
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
    make_mnist_idx,
    offline_env,
    run_example,
    write_config,
)

EX = "01_basic_convnet"


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    return run_example(EX, ["--epochs", "3"], output_dir=out, ranks=2)


def test_two_ranks_learn_and_report(two_rank_run):
    r = two_rank_run
    assert r.rc == 0, r
    m = r.metrics
    assert m["world_size"] == 2 and m["example"] == EX
    assert len(m["epochs"]) == 3
    assert m["final"]["test_accuracy"] >= 80.0, m["final"]
    assert m["final"]["quality"] in ("Good", "Excellent")
    # each of the 10,000 training images seen once per epoch across the two ranks, counted globally
    assert all(e["train_images"] == 10_000 for e in m["epochs"]), m["epochs"]
    for key in ("train_loss", "train_accuracy", "test_accuracy", "lr", "grad_norm", "skipped_steps",
                "epoch_time_s", "images_per_s"):
        assert key in m["epochs"][0]
    assert m["config"]["train_micro_batch_size_per_gpu"] == 32 and "train_batch_size" not in m["config"]
    assert m["config"]["scheduler"]["params"]["total_num_steps"] == 3 * 157  # 5,000 per rank / 32
    assert "notice: fp16 is not supported on the CPU" in r.stdout


def test_two_ranks_print_once(two_rank_run):
    r = two_rank_run
    assert r.stdout.count("DeepSpeed CNN training: 01_basic_convnet") == 1, r
    assert r.stdout.count("Training finished") == 1, r
    assert "Traceback" not in r.text


def test_model_pt_loads_without_deepspeed(two_rank_run):
    mod = load_example(EX)
    model = mod.CNNModelEnhanced()
    model.load_state_dict(torch.load(two_rank_run.output_dir / "model.pt", weights_only=True))
    assert sum(p.numel() for p in model.parameters()) == 215_370
    assert (two_rank_run.output_dir / "curves.png").stat().st_size > 1000
    ckpts = sorted(p.name for p in (two_rank_run.output_dir / "checkpoints").iterdir())
    assert "latest" in ckpts and 1 <= len([c for c in ckpts if c.startswith("epoch")]) <= 2


def test_sharding_covers_each_sample_once():
    mod = load_example(EX)
    x, y = torch.arange(100).float().view(100, 1), torch.arange(100)
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            b = mod.DeviceBatches(x, y, 8, rank, 2, torch.device("cpu"), shuffle=True, seed=3)
            b.set_epoch(epoch)
            seen += [int(v) for _, lab in b for v in lab]
        assert sorted(seen) == list(range(100))
    orders = []
    for epoch in (0, 1):
        b = mod.DeviceBatches(x, y, 100, 0, 1, torch.device("cpu"), shuffle=True, seed=3)
        b.set_epoch(epoch)
        orders.append(next(iter(b))[1].tolist())
    assert orders[0] != orders[1]  # reshuffled every epoch


def test_plain_python_and_max_steps(tmp_path):
    r = run_example(EX, ["--epochs", "2", "--max-steps", "20", "--log-interval", "10"], output_dir=tmp_path / "o",
                    launcher="python")
    assert r.rc == 0, r
    m = r.metrics
    assert m["final"]["epochs_completed"] == 1 and len(m["epochs"]) == 1
    assert "step     20" in r.stdout and "Stopping at --max-steps 20" in r.stdout


def test_torchrun_two_ranks(tmp_path):
    r = run_example(EX, ["--epochs", "1", "--max-steps", "10"], output_dir=tmp_path / "o", ranks=2,
                    launcher="torchrun")
    assert r.rc == 0, r
    assert r.metrics["world_size"] == 2


def test_resume_continues_as_if_never_stopped(tmp_path):
    straight = run_example(EX, ["--epochs", "3"], output_dir=tmp_path / "a", launcher="python")
    assert straight.rc == 0, straight
    # 313 steps = exactly one epoch at 1 rank: stop there, then resume to the end
    first = run_example(EX, ["--epochs", "3", "--max-steps", "313"], output_dir=tmp_path / "b", launcher="python")
    assert first.rc == 0 and len(first.metrics["epochs"]) == 1, first
    resumed = run_example(EX, ["--epochs", "3", "--resume"], output_dir=tmp_path / "b", launcher="python")
    assert resumed.rc == 0, resumed
    assert "continuing at epoch 2" in resumed.stdout
    a, b = straight.metrics, resumed.metrics
    assert [e["epoch"] for e in b["epochs"]] == [1, 2, 3]
    for ea, eb in zip(a["epochs"], b["epochs"]):
        assert ea["train_loss"] == pytest.approx(eb["train_loss"], rel=1e-6)
    assert a["final"]["test_accuracy"] == pytest.approx(b["final"]["test_accuracy"], abs=1e-9)
    wa = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_mnist_from_idx_files(tmp_path):
    data = make_mnist_idx(tmp_path / "data", n_train=640, n_test=200)
    r = run_example(EX, ["--dataset", "mnist", "--data-dir", data, "--epochs", "3", "--warmup-epochs", "1"],
                    output_dir=tmp_path / "o", launcher="python")
    assert r.rc == 0, r
    assert r.metrics["final"]["test_accuracy"] > 50.0, r.metrics["final"]  # chance is 10%
    assert "640 train / 200 test" in r.stdout


def test_mnist_offline_without_files(tmp_path):
    r = run_example(EX, ["--dataset", "mnist", "--data-dir", tmp_path / "empty"], output_dir=tmp_path / "o",
                    launcher="python")
    assert_clean_error(r, "MNIST", "--dataset synthetic")
    assert not (tmp_path / "o" / "metrics.json").exists()


@pytest.mark.parametrize("case", CONTRACT_BAD_INPUT + ["batch_for_one_gpu"])
def test_bad_input(tmp_path, case):
    if case == "batch_for_one_gpu":
        cfg = write_config(EX, tmp_path / "c.json", lambda c: c.update(train_batch_size=32))
        args, needles = ["--deepspeed_config", cfg], ["train_batch_size"]
    else:
        args, needles = contract_bad_input(EX, case, tmp_path)
    out = tmp_path / "o"
    launcher, ranks = ("deepspeed", 2) if case == "batch_for_one_gpu" else ("python", 1)
    r = run_example(EX, args, output_dir=out, launcher=launcher, ranks=ranks)
    assert_clean_error(r, *needles)
    assert not (out / "metrics.json").exists() and not (out / "model.pt").exists()


@pytest.mark.parametrize("dtype,tol", [("auto", 1e-6), ("bf16", 0.25)])
def test_parity_with_plain_pytorch(dtype, tol):
    """The shipped config (fp16 falls back to fp32 on CPU) and bf16: a few DeepSpeed steps give the
    parameters a plain PyTorch Adam loop with the same schedule gives."""
    p = subprocess.run([sys.executable, str(REPO / "tests" / "parity_check.py"), EX, "--dtype", dtype],
                       capture_output=True, text=True, env=offline_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["moved"] > 0.1, res  # the steps really trained
    assert res["relative"] < tol, res


def test_two_ranks_print_the_numbers_of_one_rank_with_the_same_global_batch(tmp_path):
    """Metrics are global: 2 ranks x 16 images per step train on exactly the samples of 1 rank x 32
    (rank r takes every world-th sample of the epoch's permutation) with the same mean gradient, so the
    reported numbers agree up to float summation order, which 313 Adam steps amplify to ~0.1-1%
    (measured: train loss 8.728 vs 8.737, train accuracy 31.58 vs 31.55, test loss 1.501 vs 1.514).
    A metric left unreduced (one rank's shard) or summed instead of averaged would be off by far more."""
    def micro(n):
        return write_config(EX, tmp_path / f"micro{n}.json", lambda c: c.update(train_micro_batch_size_per_gpu=n))

    one = run_example(EX, ["--epochs", "1", "--deepspeed_config", micro(32)], output_dir=tmp_path / "one", ranks=1)
    two = run_example(EX, ["--epochs", "1", "--deepspeed_config", micro(16)], output_dir=tmp_path / "two", ranks=2)
    assert one.rc == 0 and two.rc == 0, (one, two)
    a, b = one.metrics["epochs"][0], two.metrics["epochs"][0]
    assert a["train_images"] == b["train_images"] == 10_000
    assert one.metrics["config"]["scheduler"] == two.metrics["config"]["scheduler"]  # same step counts
    assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.02), (a, b)
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=0.03), (a, b)
    assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=1.5), (a, b)
    assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1.5), (a, b)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=0.05), (a, b)


def test_fp16_without_zero_is_refused_with_a_fix():
    """DeepSpeed 0.19.x fp16 without ZeRO shrinks every update: as on a GPU, the shipped fp16 config with ZeRO
    removed stops with a one-line fix; the shipped config (fp16 + ZeRO-1) passes."""
    mod = load_example(EX)
    args = mod.parse_args([])
    cfg = mod.read_config(args.deepspeed_config, 1)
    cfg, dtype = mod.finalize_config(cfg, args, 10, False, lambda *a: None)
    assert dtype == "fp16" and cfg["zero_optimization"]["stage"] == 1
    cfg = mod.read_config(args.deepspeed_config, 1)
    del cfg["zero_optimization"]
    with pytest.raises(mod.UsageError, match="fp16 needs zero_optimization.stage >= 1"):
        mod.finalize_config(cfg, args, 10, False, lambda *a: None)


def test_two_rank_cpu_run_leaves_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU all-reduce never unlinks its ~66 MB /dev/shm buffer per rank; the script does."""
    import glob
    import os

    def buffers():
        return set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"))

    before = buffers()
    r = run_example(EX, ["--epochs", "1", "--max-steps", "5"], output_dir=tmp_path / "o", ranks=2)
    assert r.rc == 0, r
    assert buffers() <= before, buffers() - before
