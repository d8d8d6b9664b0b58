"""A run owns its --output-dir while it runs, and --overwrite never loses the old run to a failure of
the new one (CONTRACT.md, "What a run leaves behind"), through the real `deepspeed` launcher on
small generated data: two runs started into one directory at once; an --overwrite whose dataset
turns out broken after the old run was set aside, and one that succeeds; and (`-m faults`) runs
killed -9 while they hold the directory, with and without an old run set aside."""

import contextlib
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from harness import (
    EXAMPLES,
    ReachedDeepSpeed,
    in_process,
    launch,
    load_example,
    make_imagefolder,
    make_mnist_idx,
)

OLD_RUN = ("checkpoints/epoch0001/mp_rank_00_model_states.pt", "checkpoints/latest", "metrics.json",
           "model.pt", "monitor/job/Train_lr.csv", "curves.png", "notes.txt")


def data(example, root, broken=False):
    """Data flags for `example`; broken: one file that only loading the data finds corrupt."""
    if example == "01_basic_convnet":
        d = make_mnist_idx(root, 320, 64)
        images = d / "MNIST" / "raw" / "train-images-idx3-ubyte"
        if broken:  # a fine header, a cut body
            images.write_bytes(images.read_bytes()[:5000])
        return ["--dataset", "mnist", "--data-dir", d]
    d = make_imagefolder(root, n_train=30, n_test=12)
    if broken:
        (d / "train" / "a" / "cut.jpg").write_text("not a picture")
    return ["--dataset", "imagefolder", "--data-dir", d]


def files(out):
    """Every file under `out` but the lock (a run killed -9 leaves it): {relative path: bytes}."""
    return {str(p.relative_to(out)): p.read_bytes() for p in Path(out).rglob("*")
            if p.is_file() and p.name != ".lock"}


def old_run(out, example):
    """The files of an earlier run (and a user's notes.txt) in `out`, as files(out) gives them;
    DeepSpeed's monitor/ csv files only where the example writes them."""
    for f in OLD_RUN:
        if f.startswith("monitor/") and "monitor" not in load_example(example).RUN_FILES:
            continue
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text(f"old {f}")
    return files(out)


def refusal(stderr):
    """The one line a refused run prints, and the pid it names."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    found = re.search(r"pid (\d+)", lines[0])
    assert found, lines[0]
    return lines[0], int(found.group(1))


EPOCHS = 5  # long enough that the first run still holds the directory when the second starts
# 01 and 03 write these functions each in their own file; 02's are 01's (tests/test_repo.py)
OWN_LOCK = ["01_basic_convnet", "03_cifar10_basic"]


@pytest.mark.parametrize("ex", OWN_LOCK)
def test_two_runs_started_into_one_directory_at_once(ex, tmp_path):
    """Exactly one trains; the other exits 2 with one line naming the pid of a process of the
    first launch (looked up while it still runs), and leaves the first run's files alone."""
    out = tmp_path / "o"
    args = data(ex, tmp_path / "d") + ["--epochs", EPOCHS, "--output-dir", out]
    named = {}  # pid a refusal names -> (its command line, whether it is the other launch's)

    def on_line(line, p):
        found = re.search(r"^error:.*pid (\d+)", line)
        if found:
            pid = int(found.group(1))
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                named[pid] = (cmd, os.getpgid(pid) != os.getpgid(p.pid))

    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(lambda _: launch(ex, args, cwd=tmp_path, on_line=on_line), range(2)))
    won = [r for r in runs if r.rc == 0]
    lost = [r for r in runs if r.rc != 0]
    assert len(won) == 1 and len(lost) == 1, "\n\n".join(map(str, runs))
    assert lost[0].rc == 2, lost[0]
    line, pid = refusal(lost[0].stderr)
    assert "--output-dir" in line and "in use" in line, line
    cmd, other = named.get(pid, ("", False))
    assert other and "train_ds.py" in cmd and str(out) in cmd, (line, cmd)
    m = json.loads((out / "metrics.json").read_text())
    assert m["final"]["epochs_completed"] == EPOCHS and len(m["epochs"]) == EPOCHS
    assert (out / "checkpoints" / "latest").read_text() == f"epoch{EPOCHS:04d}"
    assert torch.load(out / "model.pt", weights_only=True)
    assert not list(out.glob(".*")), "the lock (or a set-aside run) was left behind"


@pytest.mark.parametrize("example", EXAMPLES)
def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(example, tmp_path):
    """One launch, two --overwrite runs over an old run: the first finds its dataset corrupt only
    when it loads it (after the old run was set aside) and must leave the old run byte for byte as
    it was; the second succeeds and leaves only the new run (and the user's notes.txt)."""
    failed, replaced = tmp_path / "failed", tmp_path / "replaced"
    before = old_run(failed, example)
    old_run(replaced, example)
    common = ["--epochs", 1, "--max-steps", 2, "--overwrite"]
    sequence = [data(example, tmp_path / "broken", broken=True) + common + ["--output-dir", failed],
                data(example, tmp_path / "good") + common + ["--output-dir", replaced]]
    r = launch(example, runs=sequence, cwd=tmp_path, timeout=300)
    first, second = r.part(0), r.part(1)
    assert first.rc == 2 and re.search("corrupted|cannot read image", first.stderr), r
    assert files(failed) == before, "a failed --overwrite lost or changed the old run"
    assert second.rc == 0, r
    left = files(replaced)
    assert left.pop("notes.txt") == b"old notes.txt"
    assert not [f for f, b in left.items() if b.startswith(b"old ")], sorted(left)
    assert {f.split("/")[0] for f in left} <= {"metrics.json", "model.pt", "checkpoints", "monitor",
                                               "curves.png"}, sorted(left)
    assert not list(replaced.glob(".*")), "the set-aside run (or the lock) was left behind"
    assert json.loads((replaced / "metrics.json").read_text())["args"]["max_steps"] == 2


@pytest.mark.faults
@pytest.mark.parametrize("ex", OWN_LOCK)
def test_a_run_killed_9_frees_the_directory_and_an_old_run_set_aside_comes_back(ex, tmp_path):
    """A run holding the directory refuses a second start (naming its pid), and kill -9 frees it.
    An --overwrite killed -9 before its first checkpoint: the next start puts the old run back,
    byte for byte, with one notice line, and --resume proceeds from the old run's checkpoint."""
    out = tmp_path / "o"
    args = data(ex, tmp_path / "d") + ["--epochs", 50, "--log-interval", 1, "--output-dir", out]
    load_example(ex)  # imported here before the race below
    held = {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(launch, ex, args, cwd=tmp_path, timeout=200,
                            on_line=lambda line, p: held.setdefault("p", p))
        deadline = time.time() + 150
        while not (out / "checkpoints" / "latest").exists() and time.time() < deadline:
            assert not first.done(), first.result()
            time.sleep(0.1)
        rc, _, err = in_process(ex, args + ["--resume"])  # while the first run trains on
        line, pid = refusal(err)
        assert rc == 2 and os.getpgid(pid) == held["p"].pid, (rc, line)
        os.killpg(held["p"].pid, signal.SIGKILL)
        assert first.result().rc == -signal.SIGKILL
    before = files(out)

    def kill_at_banner(line, p):  # DeepSpeed is up, the old run set aside, no checkpoint yet
        if "DeepSpeed CNN training" in line:
            os.killpg(p.pid, signal.SIGKILL)

    killed = launch(ex, args + ["--overwrite"], cwd=tmp_path, on_line=kill_at_banner, timeout=200)
    assert killed.rc == -signal.SIGKILL and "DeepSpeed CNN training" in killed.stdout, killed
    rc, out_text, err = in_process(ex, args)
    assert rc == 2 and "already holds a run" in err, err
    notices = [ln for ln in out_text.splitlines() if ln.startswith("notice:") and "--overwrite" in ln]
    assert len(notices) == 1 and "is back" in notices[0], out_text
    assert files(out) == before
    with pytest.raises(ReachedDeepSpeed):
        in_process(ex, args + ["--resume"])
    assert files(out) == before
