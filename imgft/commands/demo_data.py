"""The demo's data: scikit-learn's bundled handwritten digits, written out as an imagefolder (no network);
and `python -m imgft demo-data DIR`, which writes it where asked."""

import argparse
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from imgft.errors import UserError

IMAGE_SIZE = 32
VALIDATION_FRACTION = 0.2


def write_digits_imagefolder(root, seed=0):
    """Write `root/train/<digit>/*.png` and `root/validation/<digit>/*.png`: 1,797 RGB 32x32 images.

    The folder appears complete or not at all: it is written beside `root` and renamed into place,
    so an interrupted write never leaves a half dataset that a later run would train on.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".digits-", dir=parent)
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        n_val = round(len(indices) * VALIDATION_FRACTION)
        for split, split_indices in (
            ("validation", indices[:n_val]),
            ("train", indices[n_val:]),
        ):
            class_dir = os.path.join(staging, split, str(label))
            os.makedirs(class_dir)
            for index in split_indices:
                digit_image(digits.images[index]).save(os.path.join(class_dir, f"{index:04d}.png"))
    if os.path.exists(root):
        shutil.rmtree(staging)
        raise FileExistsError(f"{root} already exists")
    os.rename(staging, root)
    return root


def digit_image(values):
    """One digit's 8x8 values in 0..16 as a white digit on black, upscaled smoothly to a 32x32 RGB image."""
    pixels = (values * (255 / 16)).astype(np.uint8)
    return Image.fromarray(pixels).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).convert("RGB")


def ensure_digits_imagefolder(root):
    """Return the demo folder's train and validation paths, writing the folder first if it is missing."""
    if not os.path.isdir(os.path.join(root, "train")):
        write_digits_imagefolder(root)
    return os.path.join(root, "train"), os.path.join(root, "validation")


def main(argv):
    parser = argparse.ArgumentParser(
        prog="python -m imgft demo-data",
        usage="%(prog)s DIR",
        description="Write the digits demo (1,797 RGB 32x32 images of handwritten digits, 10 classes, from "
        "scikit-learn; no download) as an imagefolder: DIR/train/<digit>/*.png and DIR/validation/<digit>/*.png. "
        "Train on it with: python train_loop.py --train_dir DIR/train --validation_dir DIR/validation",
    )
    # Optional to argparse, so that a missing or extra argument is our one-line error, not argparse's exit.
    parser.add_argument("dir", nargs="?", metavar="DIR", help="the folder to create; it must not exist yet")
    args, extras = parser.parse_known_args(argv)
    if extras or not args.dir:
        raise UserError(f"usage: {parser.prog} DIR (--help for more)")
    try:
        path = write_digits_imagefolder(args.dir)
    except FileExistsError:
        raise UserError(f"{args.dir} already exists; choose a new folder") from None
    print(f"Wrote the digits demo (train/ and validation/, 10 classes) to {path}")
