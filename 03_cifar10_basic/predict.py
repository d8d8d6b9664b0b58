"""Classify images with a trained model, without DeepSpeed at run time.

  python predict.py cat.png ship.jpg                       # runs/03_cifar10_basic/model.pt
  python predict.py --model runs/x/model.pt cat.png         # another run's model.pt
  python predict.py --zero-checkpoint runs/x/checkpoints cat.png   # a ZeRO-1/2 run's checkpoint
Images of any size are resized to 32x32 and normalized as in training. Class names come from the run's
metrics.json next to model.pt when there is one (an imagefolder run), else the CIFAR-10 names."""

import argparse
import json
import os

import torch
from PIL import Image
from torchvision import transforms
from train_ds import CLASSES, NORMALIZE, Net


def load_weights(args):
    if args.zero_checkpoint:
        # A ZeRO checkpoint keeps fp32 weights split across ranks' optimizer files: consolidate them.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(args.zero_checkpoint)
    return torch.load(args.model, map_location="cpu", weights_only=True)  # a plain state dict


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="+", help="image files to classify")
    p.add_argument("--model", default="runs/03_cifar10_basic/model.pt", help="a run's model.pt")
    p.add_argument("--zero-checkpoint", help="a run's checkpoints/ dir (ZeRO stage 1/2), instead of --model")
    args = p.parse_args()
    run_dir = os.path.dirname(os.path.normpath(args.zero_checkpoint)) if args.zero_checkpoint \
        else os.path.dirname(args.model)
    metrics = os.path.join(run_dir, "metrics.json")
    classes = CLASSES
    if os.path.isfile(metrics):
        classes = json.load(open(metrics))["final"].get("classes", CLASSES)

    model = Net()
    model.load_state_dict(load_weights(args))
    model.eval()
    prep = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor(), transforms.Normalize(*NORMALIZE)])
    batch = torch.stack([prep(Image.open(path).convert("RGB")) for path in args.images])
    with torch.no_grad():
        probs = model(batch).softmax(1)
    for path, pr in zip(args.images, probs):
        k = int(pr.argmax())
        print(f"{path}: {classes[k] if k < len(classes) else k} ({100 * pr[k]:.1f}%)")


if __name__ == "__main__":
    main()
