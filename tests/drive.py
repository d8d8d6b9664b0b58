"""Run an example's train_ds.py entry point, run(argv), one or more times in this process, as the
`deepspeed` launcher (or plain `python`) would run the script, optionally with faults injected at
the script's data seam, train_batches(data, epoch). Test code: nothing here is in the examples.

  python tests/drive.py EXAMPLE [--nan K:R:E:B,...] [--drop K:R:E:B,...] [--fsize K:BYTES]
                         :: ARGS [:: ARGS ...]
  deepspeed --num_gpus=2 tests/drive.py EXAMPLE --nan 0:1:1:2 :: --epochs 2 --output-dir out

K:R:E:B names run K (from 0), global rank R, epoch E (from 1) and micro-batch B of that epoch
(from 0): --nan fills its images with NaN, --drop leaves it out. --fsize K:BYTES makes run K's file
writes past BYTES fail as on a full disk (RLIMIT_FSIZE, EFBIG). Each run ends with a line `@@ run K rc N` on stdout and
stderr (rank 0's). Runs after the first reuse the process group (the launcher's ranks stay up), so a test pays
the imports and the launcher once for several runs; a run stopped by SIGINT or SIGTERM returns its
exit code and the next run starts with the default handlers again. With --weights DIR each rank writes, after
every saved epoch, a checksum of its model (DIR/rank<R>.jsonl): ranks must hold the same model.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def spec(text):
    return {tuple(int(v) for v in item.split(":")) for item in text.split(",") if item}


def main():
    argv = sys.argv[1:]
    own = argv[: argv.index("::")] if "::" in argv else argv
    runs = []
    for arg in argv[len(own):]:
        if arg == "::":
            runs.append([])
        else:
            runs[-1].append(arg)
    p = argparse.ArgumentParser()
    p.add_argument("example")
    p.add_argument("--nan", type=spec, default=set())
    p.add_argument("--drop", type=spec, default=set())
    p.add_argument("--fsize", type=lambda t: dict([map(int, t.split(":"))]), default={})
    p.add_argument("--weights")
    p.add_argument("--local_rank", type=int)  # the launcher passes it; RANK says the same
    opts = p.parse_args(own)
    sys.path.insert(0, str(REPO / opts.example))  # as `python train_ds.py` would have it
    loader = importlib.util.spec_from_file_location("train_ds", REPO / opts.example / "train_ds.py")
    mod = importlib.util.module_from_spec(loader)
    sys.modules["train_ds"] = mod  # so that its functions pickle by name (data-loader processes)
    loader.loader.exec_module(mod)
    rank = int(os.environ.get("RANK", 0))
    batches = mod.train_batches

    current = [0]  # the run under way

    def faulty(data, epoch):
        for b, (x, y) in enumerate(batches(data, epoch)):
            where = (current[0], rank, epoch + 1, b)
            if where in opts.drop:
                continue
            yield (x.clone().fill_(float("nan")) if where in opts.nan else x), y

    mod.train_batches = faulty
    if opts.weights:
        save = mod.save_epoch

        def save_and_record(engine, run, *a, **k):
            save(engine, run, *a, **k)
            digest = hashlib.sha256()
            for name, value in sorted(engine.module.state_dict().items()):
                if not torch.is_tensor(value):  # the class names (extra state)
                    continue
                digest.update(name.encode() + value.detach().float().cpu().numpy().tobytes())
            Path(opts.weights).mkdir(parents=True, exist_ok=True)
            with open(Path(opts.weights) / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"run": current[0], "epoch": run.epoch,
                                    "sha256": digest.hexdigest()}) + "\n")

        mod.save_epoch = save_and_record
    destroy = mod.dist.destroy_process_group
    mod.dist.destroy_process_group = lambda *a, **k: None  # keep the ranks' group for the next run
    codes = []
    for k, args in enumerate(runs):
        current[0], start = k, time.time()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        if k in opts.fsize:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (opts.fsize[k], limit[1]))
        codes.append(mod.run(args))
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        for stream in (sys.stdout, sys.stderr) if rank == 0 else ():
            print(f"@@ run {k} rc {codes[-1]} ({time.time() - start:.1f} s)", file=stream, flush=True)
    if mod.dist.is_initialized():
        destroy()
    return 0  # each run's exit code is in its `@@ run` line


if __name__ == "__main__":
    sys.exit(main())
