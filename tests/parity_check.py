"""Parity: a few steps of an example's own training step (its config handling, DeepSpeed engine,
loss and optimizer_step) against a plain PyTorch loop with the same init, data, optimizer, gradient
clipping and LR schedule. Prints one JSON line per case. Several cases share one process.

  python tests/parity_check.py 02_cifar10:auto 02_cifar10:bf16 01_basic_convnet:auto [--steps 8]

Runs on the GPU when there is one (fp16 and bf16 cases), else on the CPU (gloo)."""

import argparse
import copy
import inspect
import json
import math
import sys
from pathlib import Path

import torch
from harness import load_example

REPO = Path(__file__).resolve().parents[1]
MODELS = {"01_basic_convnet": ("CNNModelEnhanced", (1, 28, 28)),
          "02_cifar10": ("CIFAR10CNNEnhanced", (3, 32, 32)),
          "03_cifar10_basic": ("Net", (3, 32, 32))}


def tensors(state):
    """A state dict without its non-tensor entries (the model's class names, its extra state)."""
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def reference_lr(cfg, k):
    """LR of optimizer step k (from 0) under DeepSpeed's schedulers: stepped after each optimizer
    step from last_batch_iteration -1, so step k uses i = k - 1."""
    base, s = cfg["optimizer"]["params"]["lr"], cfg.get("scheduler")
    if not s:
        return base
    p, i = s["params"], k - 1
    if s["type"] == "WarmupLR":
        w, lo, hi = p.get("warmup_num_steps", 1000), p.get("warmup_min_lr", 0.0), p.get("warmup_max_lr", base)
        if i < 0 or i >= w:
            return lo if i < 0 else hi
        r = i / w if p.get("warmup_type", "log") == "linear" else math.log(i + 1) / math.log(w)
        return lo + (hi - lo) * r
    assert s["type"] == "WarmupCosineLR", s["type"]
    if i < 0:
        return 0.0
    w, total = max(2, p["warmup_num_steps"]), p["total_num_steps"]
    if i < w:
        r = i / w if p.get("warmup_type", "log") == "linear" else math.log(i + 1) / math.log(w)
        return base * (p.get("warmup_min_ratio", 0.0) + r * (1 - p.get("warmup_min_ratio", 0.0)))
    prog = min(1.0, (i - w + 1) / max(1, total - w))
    cmin = p.get("cos_min_ratio", 1e-4)
    return base * max(0.0, cmin + (1 - cmin) * (1 + math.cos(math.pi * prog)) / 2)


def reference_optimizer(cfg, params):
    o = cfg["optimizer"]
    kw = {k: v for k, v in o["params"].items() if k not in ("torch_adam", "adam_w_mode", "fused", "foreach")}
    if o["type"].lower() == "adam":
        assert o["params"].get("adam_w_mode") is False, "the config must ask for true Adam"
        return torch.optim.Adam(params, **kw)
    return getattr(torch.optim, o["type"])(params, **kw)


def check(example, dtype, config, steps, first):
    import deepspeed

    ex = load_example(example)
    basic = not hasattr(ex, "fill_schedule")  # 03: WarmupLR only, DeepSpeed clips, loss inline
    args = ex.parse_args(["--epochs", "4", "--dtype", dtype] + ([] if basic else ["--warmup-epochs", "1"])
                         + (["--deepspeed_config", config] if config else []))
    if first:
        ex.setup_distributed()
    device = torch.device(get_device())
    world = [1] if len(inspect.signature(ex.load_config).parameters) == 3 else []  # 02 asks
    cfg, dtype, *own_clip = ex.load_config(args, *world, device.type == "cpu")
    own_clip = own_clip[0] if own_clip else None
    if not basic:
        ex.fill_schedule(cfg, args, max(1, steps // 4))
    name, shape = MODELS[example]
    torch.manual_seed(0)
    model = getattr(ex, name)()
    ref = copy.deepcopy(model).to(device)
    init = {k: v.detach().clone().float().to(device) for k, v in tensors(model.state_dict()).items()}
    micro, g = cfg["train_micro_batch_size_per_gpu"], torch.Generator().manual_seed(1)
    batches = [(torch.randn(micro, *shape, generator=g), torch.randint(0, 10, (micro,), generator=g))
               for _ in range(steps)]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    in_dtype = ex.DTYPES[dtype]
    scales, applied = [], []  # per step: the loss scale used, and whether the update was applied
    for x, y in batches:
        scales.append(float(getattr(engine.optimizer, "cur_scale", 1.0) or 1.0))
        engine.set_gradient_accumulation_boundary(True)
        loss = loss_of(ex, engine, x.to(device, in_dtype), y.to(device), args)
        engine.backward(loss)
        if len(inspect.signature(ex.optimizer_step).parameters) == 1:  # 01, 03: norm or None
            applied.append(ex.optimizer_step(engine) is not None)
        else:  # 02: (norm, applied), clipping by the script where own_clip is a number
            applied.append(ex.optimizer_step(engine, own_clip)[1])

    # The reference: fp32 master weights; forward and backward in the engine's precision.
    opt = reference_optimizer(cfg, ref.parameters())
    clip = own_clip if own_clip is not None else cfg.get("gradient_clipping", 1.0)
    work = copy.deepcopy(ref).to(in_dtype) if in_dtype != torch.float32 else ref
    k = 0  # optimizer steps taken: a skipped step neither updates nor moves the LR schedule
    for (x, y), scale, ok in zip(batches, scales, applied):
        if not ok:
            continue
        if work is not ref:
            work.load_state_dict({**ref.state_dict(), **{n: v.to(in_dtype) for n, v in
                                                         tensors(ref.state_dict()).items()}})
        work.zero_grad()
        (loss_of(ex, work, x.to(device, in_dtype), y.to(device), args) * scale).backward()
        for p, q in zip(ref.parameters(), work.parameters()):
            p.grad = q.grad.float() / scale
        for name, b in work.named_buffers():  # BatchNorm's running statistics moved in `work`
            ref.get_buffer(name).copy_(b)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        for group in opt.param_groups:
            group["lr"] = reference_lr(cfg, k)
        opt.step()
        k += 1

    ds = {k: v.to(device) for k, v in tensors(ex.plain_weights(engine)).items()}
    rs = {k: v.float() for k, v in tensors(ref.state_dict()).items()}
    moved = math.sqrt(sum(((rs[k] - init[k]) ** 2).sum().item() for k in rs if rs[k].is_floating_point()))
    diff = math.sqrt(sum(((ds[k] - rs[k]) ** 2).sum().item() for k in rs if rs[k].is_floating_point()))
    return {"example": example, "dtype": dtype, "device": device.type, "steps": steps,
            "clip": clip, "moved": moved, "diff": diff, "relative": diff / max(moved, 1e-12),
            "skipped": applied.count(False)}


def loss_of(ex, model, x, y, args):
    """The example's loss: its forward_loss, or 03's inline cross-entropy on fp32 logits."""
    if hasattr(ex, "forward_loss"):
        return ex.forward_loss(model, x, y, args)[0]
    return torch.nn.functional.cross_entropy(model(x).float(), y)


def get_device():
    from deepspeed.accelerator import get_accelerator

    return "cpu" if get_accelerator().device_name() == "cpu" else get_accelerator().device_name(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="+", help="EXAMPLE:DTYPE[:CONFIG]")
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    for i, case in enumerate(a.cases):
        example, dtype, *config = case.split(":")
        print(json.dumps(check(example, dtype, config[0] if config else None, a.steps, i == 0)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
