"""Python launcher: builds and runs the `deepspeed` command for train_ds.py.

  python main.py --num_gpus 2            # = deepspeed --num_gpus=2 train_ds.py --deepspeed ...
  python main.py --num_gpus 2 --config ds_config_zero2.json -- --epochs 10 --dataset synthetic
Everything after `--` goes to train_ds.py. The exit code is train_ds.py's (through the launcher).
Standard library only, so it runs under any Python that can see the `deepspeed` command."""

import argparse
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def find_deepspeed():
    """`deepspeed` on PATH, else next to this Python (a venv run as `uv run python main.py`)."""
    found = shutil.which("deepspeed")
    beside = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return found or (beside if os.access(beside, os.X_OK) else None)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_gpus", "--num-gpus", type=int, default=None,
                   help="GPUs (processes) on this machine (default: all, as the launcher does)")
    p.add_argument("--config", default=os.path.join(HERE, "ds_config.json"),
                   help="DeepSpeed config (default: ds_config.json next to this file)")
    p.add_argument("--master_port", "--master-port", type=int, default=None,
                   help="rendezvous port (default: the launcher's 29500)")
    args = p.parse_args(own)
    if args.num_gpus is not None and args.num_gpus < 1:
        p.error("--num_gpus must be at least 1")
    deepspeed = find_deepspeed()
    if deepspeed is None:
        print("error: the `deepspeed` command is not on PATH (nor next to this Python); pip "
              "install deepspeed, or activate the environment that has it", file=sys.stderr)
        return 2
    cmd = [deepspeed]
    if args.num_gpus is not None:
        cmd.append(f"--num_gpus={args.num_gpus}")
    if args.master_port is not None:
        cmd.append(f"--master_port={args.master_port}")
    cmd += [os.path.join(HERE, "train_ds.py"), "--deepspeed", "--deepspeed_config", args.config,
            *extra]
    print("+ " + " ".join(cmd), flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
