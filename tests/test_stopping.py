"""Stopping from outside (the contract): SIGTERM to the process group, to the `deepspeed` command
or to its child (DeepSpeed's launch.py) ends every rank within 30 s, with the latest checkpoint
intact, no traceback from any rank, no process left behind and the resume line printed once.
Run on 02 with 2 ranks through the real launcher for every target, and on 01 and 03 (whose ranks
read through DeepSpeed's loader and its worker processes) for the `deepspeed` command."""

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time

import pytest
from harness import launch, make_imagefolder, make_mnist_idx, script, write_config

pytestmark = pytest.mark.faults
# Where SIGTERM goes, and the exit code of the `deepspeed` command then: killed by the signal
# itself, or DeepSpeed's launch.py ending with 1 after it stopped the ranks.
TARGETS = {"group": -signal.SIGTERM, "deepspeed": -signal.SIGTERM, "launch.py": 1}


def ps(*selector):
    """'PID STATE COMMAND' of the live processes ps selects (e.g. "-s", SID: a session); not the
    zombies of processes that ended before their parent (or the init that adopted them) waited."""
    out = subprocess.run(["ps", "-o", "pid=,stat=,args=", *selector], capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if not line.split()[1].startswith("Z")]


@pytest.mark.parametrize("target", TARGETS)
def test_sigterm_from_outside_stops_every_rank(target, tmp_path):
    """SIGTERM at the first step of epoch 2 (epoch 1 is checkpointed). With the `deepspeed` command
    gone nobody signals the ranks: they must notice that their launcher went away."""
    sent, sid = [], []

    def stop(line, p):
        if not sent and "| epoch   2 |" in line:
            sid.append(p.pid)  # the launch is a session of its own: every process it started
            pid = {"group": -p.pid, "deepspeed": p.pid}.get(target)
            if pid is None:  # DeepSpeed's launch.py, the command's one child
                pid = int(ps("--ppid", str(p.pid))[0].split()[0])
            sent.append(time.time())
            os.kill(pid, signal.SIGTERM)  # a negative pid: the whole process group

    cfg = write_config("02_cifar10", tmp_path / "c.json", lambda c: c.update(
        train_micro_batch_size_per_gpu=8))
    args = ["--dataset", "imagefolder", "--data-dir", make_imagefolder(tmp_path / "imgs", n_train=80,
            n_test=20), "--epochs", "1000", "--patience", "1000", "--log-interval", "1",
            "--deepspeed_config", cfg]
    out = tmp_path / "o"
    try:
        r = launch("02_cifar10", args, output_dir=out, ranks=2, on_line=stop, timeout=150, linger=40)
        took = time.time() - sent[0] if sent else None
        left = ps("-s", str(sid[0])) if sid else []
    finally:
        with contextlib.suppress(ProcessLookupError, IndexError):
            os.killpg(sid[0], signal.SIGKILL)  # whatever this test left running
    assert sent, r
    assert not left, f"left running after SIGTERM to {target}: {left}\n{r}"
    assert took < 30, f"{took:.1f} s\n{r}"
    assert r.rc == TARGETS[target], r
    assert "Traceback" not in r.text, r
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert int(tag[5:]) >= 1 and not [p for p in out.rglob("*") if ".tmp" in p.name]
    stopped = re.findall(r"^stopped: epoch (\d+) is checkpointed", r.stderr, re.M)
    assert stopped == [str(int(tag[5:]))], r  # once, naming the checkpoint `latest` names
    # 02 prints the command that continues: --resume takes the other flags from the checkpoint
    told = re.search(r"; to continue: (.+)$", r.stderr, re.M)
    assert told, r
    command = shlex.split(told.group(1))
    assert command[:3] == ["deepspeed", "--num_gpus=2", str(script("02_cifar10"))], command
    if target == "group":  # the checkpoint loads and training goes on from it, as the line says
        again = launch("02_cifar10", [*command[3:], "--max-steps", "1"], launcher="python")
        assert again.rc == 0 and f"continuing at epoch {int(tag[5:]) + 1}" in again.stdout, again
        assert "from the checkpoint:" in again.stdout and "epochs=1000" in again.stdout, again


@pytest.mark.parametrize("example", ["01_basic_convnet", "03_cifar10_basic"])
def test_the_ranks_of_01_and_03_notice_their_launcher_is_gone(example, tmp_path):
    """The same contract in the other rungs, where it rests on watch_launcher alone: SIGTERM to the
    `deepspeed` command (which forwards no signal on one node) in epoch 2 ends both ranks within
    30 s, with nothing left running, epoch 1's checkpoint intact, one stop line and no traceback
    (a loader worker's handover cut by the stop printed one in about 1 run of 9 before
    quiet_a_stopped_handover)."""
    sent, sid = [], []
    epoch_2 = {"01_basic_convnet": "| epoch   2 |", "03_cifar10_basic": "[2, "}[example]

    def stop(line, p):
        if not sent and epoch_2 in line:
            sid.append(p.pid)
            sent.append(time.time())
            os.kill(p.pid, signal.SIGTERM)

    data = {"01_basic_convnet": ["--dataset", "mnist", "--data-dir",
                                 make_mnist_idx(tmp_path / "mnist", 80, 20), "--patience", "1000"],
            "03_cifar10_basic": ["--dataset", "synthetic", "--synthetic-size", "80"]}[example]
    out = tmp_path / "o"
    try:
        r = launch(example, [*data, "--epochs", "1000", "--log-interval", "1"], output_dir=out,
                   ranks=2, on_line=stop, timeout=150, linger=40)
        took = time.time() - sent[0] if sent else None
        left = ps("-s", str(sid[0])) if sid else []
    finally:
        with contextlib.suppress(ProcessLookupError, IndexError):
            os.killpg(sid[0], signal.SIGKILL)
    assert sent, r
    assert not left, f"left running after SIGTERM to the deepspeed command: {left}\n{r}"
    assert took < 30, f"{took:.1f} s\n{r}"
    assert r.rc == -signal.SIGTERM, r
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert int(tag[5:]) >= 1 and not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert r.stderr.count("stopped (exit code 143)") == 1, r
    assert "Traceback" not in r.text, r
