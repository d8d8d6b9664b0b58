"""Classify your own images with the model.pt a training run wrote; no GPU needed.

  python predict.py cat.png ship.jpg                      # runs/03_cifar10_basic/model.pt
  python predict.py --model runs/fast/model.pt photos/    # every image in a folder
Prints the three likeliest classes of each image. Images of any size are converted to RGB and
resized to 32x32, then normalized as in training; model.pt carries the class names.
"""

import argparse
import json
import os
import sys

import torch
from train_ds import TRANSFORM, Net

EXAMPLE, MODEL = "03_cifar10_basic", Net


def load_model(path):
    """model.pt (a plain state dict, loaded with weights_only=True) in its model class, and the
    class names it carries (the model's extra state)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: no model at {path}; train first (train_ds.py writes model.pt) "
                         "or pass --model PATH") from None
    except Exception as e:  # noqa: BLE001 - not a torch file, a pickle with code in it, truncated
        raise SystemExit(f"error: {path} is not a model.pt ({type(e).__name__})") from None
    names = state.get("_extra_state") if isinstance(state, dict) else None
    if not torch.is_tensor(names):
        raise SystemExit(f"error: {path} carries no class names (an older train_ds.py wrote it); "
                         "train again to get a model.pt that names its classes")
    try:
        model = MODEL(num_classes=len(json.loads(bytes(names.byte().tolist()))))
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, ValueError):  # another model, another shape
        raise SystemExit(f"error: {path} holds no {EXAMPLE} model (its weights do not fit "
                         f"{MODEL.__name__})") from None
    return model.eval(), model.classes


def read_image(path):
    """One image as the model's input [1, 3, 32, 32], transformed as in training."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return TRANSFORM(im.convert("RGB")).unsqueeze(0)
    except FileNotFoundError:
        raise SystemExit(f"error: no such image: {path}") from None
    except (OSError, ValueError):
        raise SystemExit(f"error: {path} is not an image this can read") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", help="image files or folders of them")
    p.add_argument("--model", default=f"runs/{EXAMPLE}/model.pt", help="a run's model.pt")
    args = p.parse_args(argv)
    model, classes = load_model(args.model)
    paths = []
    for item in args.images:  # a folder stands for the files in it
        paths += sorted(os.path.join(item, f) for f in os.listdir(item) if not f.startswith(".")) \
            if os.path.isdir(item) else [item]
    if not paths:
        raise SystemExit(f"error: no images in {', '.join(args.images)}")
    inputs = [read_image(path) for path in paths]  # every file is checked before any output
    with torch.no_grad():
        probs = model(torch.cat(inputs)).softmax(1)
    for path, pr in zip(paths, probs):
        top = pr.topk(min(3, len(classes)))
        print(f"{path}: " + ", ".join(
            f"{classes[int(k)]} {100 * float(v):.1f}%" for v, k in zip(top.values, top.indices)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
