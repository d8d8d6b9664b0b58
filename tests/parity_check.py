"""Parity: a few DeepSpeed steps (the example's own config handling, engine and loss) against a plain
PyTorch loop with the same init, data, optimizer semantics and LR schedule. Prints one JSON line.

  python tests/parity_check.py EXAMPLE --dtype fp32|bf16|fp16 [--config PATH] [--steps 8]

Runs on the GPU when there is one (fp16/bf16 checks), else on the CPU (gloo)."""

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch
from harness import load_example

REPO = Path(__file__).resolve().parents[1]


def reference_lr(cfg, k):
    """LR of optimizer step k (0-based) under DeepSpeed's WarmupCosineLR: the scheduler is stepped
    after each optimizer step and starts at lr 0 (last_batch_iteration -1), so step k uses i = k - 1."""
    base = cfg["optimizer"]["params"]["lr"]
    s = cfg.get("scheduler")
    if not s:
        return base
    p, i = s["params"], k - 1
    if s["type"] == "WarmupLR":
        w = p.get("warmup_num_steps", 1000)
        lo, hi = p.get("warmup_min_lr", 0.0), p.get("warmup_max_lr", base)
        if i < 0:
            return lo
        if i >= w:
            return hi
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
        assert o["params"].get("adam_w_mode") is False, "config must ask for true Adam"
        return torch.optim.Adam(params, **kw)
    return getattr(torch.optim, o["type"])(params, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("example")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--config", default=None)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    ex = load_example(a.example)
    args = ex.parse_args(["--epochs", "4", "--warmup-epochs", "1", "--dtype", a.dtype]
                         + (["--deepspeed_config", a.config] if a.config else []))
    rank, world, device = ex.setup_distributed()
    cfg = ex.read_config(args.deepspeed_config, world)
    steps_per_epoch = max(1, a.steps // 4)
    cfg, dtype = ex.finalize_config(cfg, args, steps_per_epoch, device.type == "cpu", lambda *m: None)

    torch.manual_seed(0)
    model = ex.build_model()
    ref = copy.deepcopy(model).to(device)
    init = {k: v.detach().clone().to(device) for k, v in model.state_dict().items()}
    micro = cfg["train_micro_batch_size_per_gpu"]
    g = torch.Generator().manual_seed(1)
    shape = ex.INPUT_SHAPE
    batches = [(torch.randn(micro, *shape, generator=g), torch.randint(0, 10, (micro,), generator=g))
               for _ in range(a.steps)]

    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    in_dtype = next(engine.module.parameters()).dtype
    scales, skipped = [], []  # per step: the loss scale used, and whether DeepSpeed skipped the update
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        scales.append(float(getattr(engine.optimizer, "cur_scale", 1.0) or 1.0))
        before = engine.skipped_steps
        loss, _ = ex.forward_loss(engine, x.to(in_dtype), y, args)
        engine.backward(loss)
        engine.step()
        skipped.append(engine.skipped_steps != before)

    # Reference: fp32 master weights; the forward/backward runs in the engine's precision.
    opt = reference_optimizer(cfg, ref.parameters())
    clip = cfg.get("gradient_clipping", 1.0)
    work = copy.deepcopy(ref).to(in_dtype) if in_dtype != torch.float32 else ref
    k = 0  # optimizer steps taken: DeepSpeed neither updates nor steps its LR scheduler on a skipped step
    for (x, y), scale, skip in zip(batches, scales, skipped):
        if skip:  # fp16 overflow (or a non-finite bf16 step): mirror DeepSpeed and leave the weights alone
            continue
        x, y = x.to(device), y.to(device)
        if work is not ref:
            work.load_state_dict({n: v.to(in_dtype) for n, v in ref.state_dict().items()})
        work.zero_grad()
        (ex.forward_loss(work, x.to(in_dtype), y, args)[0] * scale).backward()  # same loss scale as DeepSpeed
        for p, q in zip(ref.parameters(), work.parameters()):
            p.grad = q.grad.float() / scale
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        for group in opt.param_groups:
            group["lr"] = reference_lr(cfg, k)
        opt.step()
        k += 1

    ds = {k: v.to(device) for k, v in ex.master_weights(engine).items()}  # fp32 masters, as model.pt holds
    rs = {k: v.float() for k, v in ref.state_dict().items()}
    moved = math.sqrt(sum(((rs[k] - init[k].float()) ** 2).sum().item() for k in rs if rs[k].is_floating_point()))
    diff = math.sqrt(sum(((ds[k] - rs[k]) ** 2).sum().item() for k in rs if rs[k].is_floating_point()))
    print(json.dumps({"example": a.example, "dtype": dtype, "device": device.type, "steps": a.steps,
                      "moved": moved, "diff": diff, "relative": diff / max(moved, 1e-12),
                      "skipped": sum(skipped), "loss_scale": getattr(engine.optimizer, "cur_scale", None)}))


if __name__ == "__main__":
    sys.exit(main())
