"""03_cifar10_basic, run for real on the CPU: the seed's command line through the deepspeed launcher
(1 and 2 ranks), each shipped config, the Python launcher main.py, resume, predict.py, bad input, parity."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import (
    CONTRACT_BAD_INPUT,
    REPO,
    assert_clean_error,
    contract_bad_input,
    free_port,
    load_example,
    make_imagefolder,
    offline_env,
    run_example,
)

EX = "03_cifar10_basic"
DIR = REPO / EX
# The CPU accelerator JIT-builds DeepSpeed's shm comm op into TORCH_EXTENSIONS_DIR. A private cache keeps
# it built once, even when other checkouts/jobs on the machine build it with different flags meanwhile.
ENV = {"TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "torch_extensions_03")}
SMALL = ["--dataset", "synthetic", "--synthetic-size", "800", "--log-interval", "50"]


def seed_flags(config="ds_config.json"):
    return ["--deepspeed", "--deepspeed_config", DIR / config]  # the seed's exact flags


def run(args, out, **kw):
    return run_example(EX, args, output_dir=out, env={**ENV, **kw.pop("env", {})}, **kw)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    return run(seed_flags() + SMALL + ["--synthetic-size", "1600"], out, ranks=2)


def test_seed_command_two_ranks_learns_and_reports(two_rank_run):
    r = two_rank_run
    assert r.rc == 0, r
    m = r.metrics
    assert m["world_size"] == 2 and m["example"] == EX and len(m["epochs"]) == 2  # default --epochs 2
    assert m["final"]["test_accuracy"] > 25.0, m["final"]  # chance is 10%
    assert all(e["train_images"] == 1600 for e in m["epochs"]), m["epochs"]  # 800 per rank, once each
    cfg = m["config"]
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and "train_batch_size" not in cfg
    assert m["final"]["global_batch_size"] == 8 and m["final"]["parameters"] == 62_006
    assert cfg["gradient_clipping"] == 0.0 and cfg["scheduler"]["type"] == "WarmupLR"
    assert "4 per rank x 1 accumulation x 2 ranks = 8 global; 200 micro-steps" in r.stdout
    # the seed's line, every 50 steps of each epoch, loss averaged over the interval
    assert re.search(r"^\[1,    50\] loss: \d\.\d{3} ", r.stdout, re.M), r
    assert re.search(r"^\[2,   200\] loss: \d\.\d{3} ", r.stdout, re.M), r
    assert "accuracy of airplane" in r.stdout and len(m["final"]["per_class_accuracy"]) == 10


def test_two_ranks_print_once(two_rank_run):
    r = two_rank_run
    assert r.stdout.count("DeepSpeed CNN training: 03_cifar10_basic") == 1, r
    assert r.stdout.count("Training finished") == 1 and r.stdout.count("[1,    50]") == 1, r
    assert "Traceback" not in r.text


def test_model_pt_loads_without_deepspeed(two_rank_run):
    mod = load_example(EX)
    model = mod.Net()
    model.load_state_dict(torch.load(two_rank_run.output_dir / "model.pt", weights_only=True))
    assert sum(p.numel() for p in model.parameters()) == 62_006
    assert (two_rank_run.output_dir / "curves.png").stat().st_size > 1000
    ckpts = sorted(p.name for p in (two_rank_run.output_dir / "checkpoints").iterdir())
    assert "latest" in ckpts and 1 <= len([c for c in ckpts if c.startswith("epoch")]) <= 2


def test_deepspeed_loader_reshuffles_every_epoch():
    """The script's idiom on DeepSpeed's own loader class: set_epoch gives each epoch a new order, and the
    ranks' shards cover the data once. Without set_epoch (DeepSpeed never calls it) the order repeats."""
    from deepspeed.runtime.dataloader import DeepSpeedDataLoader
    from torch.utils.data import TensorDataset

    ds = TensorDataset(torch.arange(100).float(), torch.arange(100))

    def loader(rank):
        ld = DeepSpeedDataLoader(ds, batch_size=10, pin_memory=False, local_rank=0, tput_timer=None,
                                 num_local_io_workers=0, data_parallel_world_size=2, data_parallel_rank=rank)
        ld.data_sampler.seed = 42  # as the script does with --seed
        return ld

    def order(ld, epoch=None):
        if epoch is not None:
            ld.data_sampler.set_epoch(epoch)
        return [int(v) for _, lab in ld for v in lab]

    lds = [loader(0), loader(1)]
    assert order(lds[0]) == order(lds[0])  # DeepSpeed alone: the same order every epoch
    for epoch in (0, 1):
        assert sorted(order(lds[0], epoch) + order(lds[1], epoch)) == list(range(100))
    assert order(lds[0], 0) != order(lds[0], 1)
    src = (DIR / "train_ds.py").read_text()
    assert "trainloader.data_sampler.set_epoch(epoch)" in src and "training_data=trainset" in src


@pytest.mark.parametrize("config,ranks", [("ds_config_zero2.json", 2), ("ds_config_fp16.json", 1)])
def test_other_configs_train(tmp_path, config, ranks):
    r = run(seed_flags(config) + SMALL + ["--epochs", "3"], tmp_path / "o", ranks=ranks)
    assert r.rc == 0, r
    f = r.metrics["final"]
    assert f["test_accuracy"] > 25.0, f
    if config == "ds_config_fp16.json":
        assert "notice: fp16 is not supported on the CPU; training in fp32 instead" in r.stdout
        assert f["dtype"] == "fp32"
    else:
        assert "ZeRO stage 2" in r.stdout
        # model.pt is a plain state dict under ZeRO too; the consolidated ZeRO checkpoint of the last
        # epoch classifies like the best model when the last epoch is the best one
        state = torch.load(tmp_path / "o" / "model.pt", weights_only=True)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        zero = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "o" / "checkpoints"))
        assert set(zero) == set(state)
        if r.metrics["epochs"][-1]["test_accuracy"] == f["best_test_accuracy"]:
            assert all(torch.allclose(zero[k], state[k]) for k in state)


def test_main_py_launches_and_passes_exit_code(tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, DIR / "main.py", "--num_gpus", "1", "--master_port", str(free_port()), "--"]
    env = {**offline_env(), **ENV}
    p = subprocess.run(cmd + SMALL + ["--epochs", "1", "--output-dir", out], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "--deepspeed --deepspeed_config" in p.stdout and (out / "model.pt").exists()
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 1
    bad = subprocess.run(cmd + ["--epochs", "0", "--output-dir", out], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert bad.returncode != 0 and "--epochs must be a positive integer" in bad.stderr, bad.stderr[-2000:]


def test_main_py_without_deepspeed_on_path(tmp_path):
    py = tmp_path / "python3"  # a Python whose folder holds no `deepspeed`; main.py needs only the stdlib
    py.symlink_to(sys.executable)
    env = {**offline_env(), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([py, DIR / "main.py", "--num_gpus", "1"], capture_output=True, text=True, env=env)
    assert p.returncode == 2, p
    assert p.stderr.count("\n") == 1 and "`deepspeed` command is not on PATH" in p.stderr, p.stderr


def test_resume_continues_as_if_never_stopped(tmp_path):
    args = SMALL + ["--synthetic-size", "400"]
    straight = run(args, tmp_path / "a", launcher="python")
    assert straight.rc == 0, straight
    # 100 steps = exactly one epoch at 1 rank (400 / 4): stop there, then resume to the end
    first = run(args + ["--max-steps", "100"], tmp_path / "b", launcher="python")
    assert first.rc == 0 and len(first.metrics["epochs"]) == 1, first
    resumed = run(args + ["--resume"], tmp_path / "b", launcher="python")
    assert resumed.rc == 0, resumed
    assert "continuing at epoch 2" in resumed.stdout
    a, b = straight.metrics, resumed.metrics
    assert [e["epoch"] for e in b["epochs"]] == [1, 2]
    for ea, eb in zip(a["epochs"], b["epochs"]):
        assert ea["train_loss"] == pytest.approx(eb["train_loss"], rel=1e-6)
    assert a["final"]["test_accuracy"] == pytest.approx(b["final"]["test_accuracy"], abs=1e-9)
    wa = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_imagefolder_and_predict(tmp_path):
    data = make_imagefolder(tmp_path / "data", n_train=240, n_test=60)
    r = run(["--dataset", "imagefolder", "--data-dir", data, "--epochs", "3", "--log-interval", "20"],
            tmp_path / "o", launcher="python")
    assert r.rc == 0, r
    assert "240 train / 60 test images, 3x32x32, 3 classes" in r.stdout
    assert r.metrics["final"]["test_accuracy"] > 50.0, r.metrics["final"]  # chance is 33%
    images = sorted((data / "test").glob("*/*.png"))
    p = subprocess.run([sys.executable, DIR / "predict.py", "--model", tmp_path / "o" / "model.pt", *images],
                       capture_output=True, text=True, env=offline_env(), cwd=DIR, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ": " in ln and ln.endswith("%)")]
    assert len(lines) == len(images)
    right = sum(ln.split(": ")[1].split(" ")[0] == Path(ln.split(": ")[0]).parent.name for ln in lines)
    assert right / len(lines) > 0.5, p.stdout


def test_readme_quotes_predict_py():
    readme, src = (DIR / "README.md").read_text(), (DIR / "predict.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks and all(line in src for b in blocks for line in b.strip().splitlines()), blocks


@pytest.mark.parametrize("case", CONTRACT_BAD_INPUT + ["imagefolder_missing", "imagefolder_corrupt", "cifar_offline"])
def test_bad_input(tmp_path, case):
    args, needles = SMALL, []
    if case in CONTRACT_BAD_INPUT:
        extra, needles = contract_bad_input(EX, case, tmp_path)
        args = args + extra
    elif case == "imagefolder_missing":
        (tmp_path / "data" / "train" / "cat").mkdir(parents=True)  # no test/ at all, no images in train/
        args, needles = ["--dataset", "imagefolder", "--data-dir", tmp_path / "data"], ["imagefolder", "train"]
    elif case == "imagefolder_corrupt":
        data = make_imagefolder(tmp_path / "data", n_train=12, n_test=6)
        (data / "train" / "a" / "junk.png").write_text("not a picture")
        args, needles = ["--dataset", "imagefolder", "--data-dir", data], ["junk.png", "not a readable image"]
    elif case == "cifar_offline":
        args, needles = ["--dataset", "cifar10", "--data-dir", tmp_path / "empty"], [
            "CIFAR-10", "cifar-10-python.tar.gz", "--dataset synthetic"]
    out = tmp_path / "o"
    r = run(seed_flags() + args, out, launcher="python")
    assert_clean_error(r, *needles)
    assert not (out / "metrics.json").exists() and not (out / "model.pt").exists()


def test_parity_with_plain_pytorch():
    """The shipped config (fp32, WarmupLR in optimizer steps): DeepSpeed steps give the parameters a plain
    PyTorch Adam loop with the same schedule gives."""
    p = subprocess.run([sys.executable, str(REPO / "tests" / "parity_check.py"), EX, "--dtype", "auto",
                        "--steps", "16"], capture_output=True, text=True, env={**offline_env(), **ENV}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["dtype"] == "fp32" and res["moved"] > 0.1, res
    assert res["relative"] < 1e-6, res


def test_gpu_runs_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", DIR / "gpu_runs.sh"]).returncode == 0
    assert os.access(DIR / "gpu_runs.sh", os.X_OK)



def test_fp16_without_zero_is_refused_with_a_fix():
    """DeepSpeed 0.19.x fp16 without ZeRO shrinks every update (DEEPSPEED_NOTES 1): on a GPU, --dtype fp16 with
    the default (no-ZeRO) config stops with a one-line fix instead of training badly; the fp16 config passes."""
    mod = load_example(EX)
    args = mod.parse_args(["--deepspeed", "--dtype", "fp16"])
    with pytest.raises(mod.UsageError, match="fp16 needs zero_optimization.stage >= 1"):
        mod.finalize_config(mod.read_config(args.deepspeed_config, 1), args, 10, False, lambda *a: None)
    args = mod.parse_args(["--deepspeed_config", str(REPO / EX / "ds_config_fp16.json")])
    cfg, dtype = mod.finalize_config(mod.read_config(args.deepspeed_config, 1), args, 10, False, lambda *a: None)
    assert dtype == "fp16" and cfg["fp16"]["enabled"] and cfg["zero_optimization"]["stage"] == 1
