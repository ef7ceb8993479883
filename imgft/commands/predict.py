"""`python -m imgft predict`: label image files with any image-classification checkpoint.

    python -m imgft predict --model_name_or_path output/mine photos/ 'more/**/*.jpg' cat.png

One JSON line per image on stdout, {"path", "label", "score", "top_k": [{"label", "score"}, ...]}, or
a .jsonl / .csv file with --output. Images get what the model's image processor gives them (the
evaluation transform training used, see imgft/preprocessing.py), so the answers are pipeline()'s;
--tta averages the logits of several views of each (imgft/tta.py), as `python -m imgft evaluate --tta`
does. Folders and globs give the files training reads as images (imgft/image_files.py). Unreadable
files, files that are not images and inputs that match nothing are named on stderr and skipped; the
exit code is 0 as long as some image was labelled, and 2 when none could be.
"""

import argparse
import csv
import difflib
import glob
import json
import os
import sys

from imgft.errors import UserError

OUTPUT_SUFFIXES = (".jsonl", ".csv")
PROGRESS_MIN_IMAGES = 100  # below this a run takes seconds and a progress bar is only noise
FLAGS = ("--model_name_or_path", "--image_processor_name", "--top_k", "--per_device_eval_batch_size", "--output")
FLAGS += ("--cache_dir", "--model_revision", "--trust_remote_code", "--tta")  # make_parser's, for "did you mean"
GLOB_CHARACTERS = "*?["


def make_parser():
    # exit_on_error=False: argparse's own errors become one `error: ...` line (UserError), like train_loop.py's.
    parser = argparse.ArgumentParser(
        prog="python -m imgft predict",
        description="Label images with a trained image classifier; one JSON line per image.",
        allow_abbrev=False,
        exit_on_error=False,
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders (searched recursively), globs")
    parser.add_argument(
        "--model_name_or_path", metavar="DIR_OR_HUB_ID", help="a trained model folder or a Hub id (required)"
    )
    parser.add_argument(
        "--image_processor_name",
        metavar="DIR_OR_HUB_ID",
        help="load the image processor from here instead of --model_name_or_path (as training's flag)",
    )
    parser.add_argument(
        "--top_k", type=int, metavar="K", default=5, help="classes listed per image (at most the class count)"
    )
    parser.add_argument(
        "--per_device_eval_batch_size", type=int, metavar="N", default=32, help="images per forward pass"
    )
    parser.add_argument("--output", metavar="FILE", help="write to this .jsonl or .csv file instead of stdout")
    parser.add_argument("--cache_dir", metavar="DIR", help="where downloaded models are kept")
    parser.add_argument(
        "--model_revision", default="main", metavar="REVISION", help="branch, tag or commit of a Hub checkpoint"
    )
    parser.add_argument("--trust_remote_code", action="store_true", help="run model code from the Hub repository")
    parser.add_argument(
        "--tta",
        choices=("flip", "zoom", "flip_zoom"),
        help="test-time augmentation, logits averaged over views: flip adds the mirrored crop; zoom the "
        "image's central 7/8 (of width and height) through the same resize and crop; flip_zoom both and "
        "the mirrored zoom (4 views)",
    )
    return parser


def parse_args(argv):
    parser = make_parser()
    try:
        # intermixed: paths may come before, between or after the flags.
        args, extras = parser.parse_known_intermixed_args(argv)
    except argparse.ArgumentError as err:
        raise UserError(str(err)) from None
    if extras:
        raise UserError(_unknown_flag_message(extras[0], parser))
    if not args.model_name_or_path:
        raise UserError("predict needs --model_name_or_path (a trained model folder or a Hub id)")
    if not args.paths:
        raise UserError("predict needs at least one image file, folder or glob to label")
    for name in ("top_k", "per_device_eval_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.output and not args.output.lower().endswith(OUTPUT_SUFFIXES):
        raise UserError(f"--output {args.output}: the file must end in .jsonl or .csv")
    return args


def _unknown_flag_message(token, parser):
    name = token.split("=", 1)[0]
    close = difflib.get_close_matches(name, FLAGS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f"; see {parser.prog} --help"
    return f"unknown flag '{name}'{hint}"


def find_images(inputs):
    """(image files in input order without repeats, [(input, why it gave nothing)], [(file, why it is skipped)]).

    A file named outright is always tried, whatever its extension; files found in folders (searched with links
    followed) or by a glob are images by `image_files`' rule, as in training: the others are skipped. A path
    that exists is taken as it is, even with glob characters in its name (`img [1].png`).
    """
    from imgft import image_files

    files, problems, skipped = [], [], []
    for pattern in inputs:
        passed_over = []
        if os.path.isdir(pattern):
            (found, passed_over), reason = image_files.images_under(pattern), "holds no image files"
        elif os.path.isfile(pattern):
            found, reason = [pattern], ""
        elif any(char in pattern for char in GLOB_CHARACTERS):
            (found, passed_over), reason = _images_matching(pattern), "matches no image file"
        else:
            found, reason = [], "no such file or folder"
        files += found
        skipped += passed_over
        if not found:
            problems.append((pattern, reason))
    return list(dict.fromkeys(files)), problems, list(dict.fromkeys(skipped))


def _images_matching(pattern):
    """(images, [(file, why it is skipped)]) of a glob: the files it matches, then the images under its folders."""
    from imgft import image_files

    matches = sorted(glob.glob(pattern, recursive=True))
    found, skipped = [], []
    for path in (match for match in matches if os.path.isfile(match) and not image_files.is_metadata(match)):
        reason = image_files.skip_reason(path)
        if reason:
            skipped.append((path, reason))
        else:
            found.append(path)
    for folder in (match for match in matches if os.path.isdir(match)):
        images, passed_over = image_files.images_under(folder)
        found += images
        skipped += passed_over
    return found, skipped


def load_image(path):
    """(RGB image, "") or (None, why it cannot be read), decoded as training decodes it."""
    from imgft import images

    return images.decode_file(path, rgb=True)


def predicted_logits(model, batch, normalize, with_views):
    """The model's logits for a B x 3 x H x W batch (uint8, or float from a processor run as it is), or with
    `with_views` (--tta) for a B x V x 3 x H x W batch of views, averaged over the views."""
    import torch

    from imgft.tta import tta_logits

    with torch.inference_mode():
        if with_views:
            return tta_logits(model, batch, normalize)
        return model(pixel_values=normalize(batch).to(next(model.parameters()).dtype)).logits


def top_classes(logits, top_k):
    """[(score, class id) best first, top_k of them] for each image's logits."""
    probabilities = logits.float().softmax(dim=-1)
    scores, ids = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
    return [
        list(zip(row_scores.tolist(), row_ids.tolist(), strict=True))
        for row_scores, row_ids in zip(scores, ids, strict=True)
    ]


def to_record(path, ranked, id2label):
    top_k = [{"label": id2label[class_id], "score": score} for score, class_id in ranked]
    return {"path": path, "label": top_k[0]["label"], "score": top_k[0]["score"], "top_k": top_k}


def predict_files(model, transform, normalize, files, batch_size, top_k, progress, with_views=False):
    """Yield one record per readable file, in order, a batch at a time: `transform` (the evaluation transform)
    runs once per batch, reading the batch's images as they are decoded; unreadable files are named through
    the progress bar (on stderr, without breaking the bar). `with_views`: `transform` gives each image's --tta
    views (`tta.views_transform`)."""
    from imgft.transforms import stack_images
    from imgft.tta import stack_views

    device = next(model.parameters()).device
    id2label = {int(key): value for key, value in model.config.id2label.items()}
    for start in range(0, len(files), batch_size):
        readable = []
        pixel_values = transform(readable_images(files[start : start + batch_size], readable, progress))
        if readable:
            batch = (stack_views if with_views else stack_images)(pixel_values).to(device)
            logits = predicted_logits(model, batch, normalize, with_views)
            for path, ranked in zip(readable, top_classes(logits, top_k), strict=True):
                yield to_record(path, ranked, id2label)
        progress.update(len(files[start : start + batch_size]))


def readable_images(paths, readable, progress):
    """Yield each of `paths`' images, decoded when asked for, and append its path to `readable`; name each
    unreadable file through the progress bar instead. A generator, so that a transform that goes image by
    image holds one decoded image at a time, not the batch."""
    for path in paths:
        image, reason = load_image(path)
        if image is None:
            progress.write(f"warning: skipping unreadable image {path}: {reason}", file=sys.stderr)
            continue
        readable.append(path)
        yield image


def write_records(records, output):
    """Write each record as it comes, as a JSON line to stdout or a .jsonl file, or a CSV row; return the count."""
    if output is None:
        return _write_json_lines(records, sys.stdout)
    try:
        file = open(output, "w", encoding="utf-8", newline="")  # noqa: SIM115 (closed by the with below)
    except OSError as err:
        raise UserError(f"cannot write --output {output}: {err.strerror}") from None
    with file:
        if output.lower().endswith(".csv"):
            return _write_csv(records, file)
        return _write_json_lines(records, file)


def _write_json_lines(records, file):
    count = 0
    for record in records:
        file.write(json.dumps(record, ensure_ascii=False) + "\n")
        file.flush()  # a reader downstream (| jq, tail -f) gets each answer when it is ready
        count += 1
    return count


def _write_csv(records, file):
    writer = csv.writer(file)
    writer.writerow(["path", "label", "score", "top_k"])
    count = 0
    for record in records:
        count += 1
        writer.writerow(
            [record["path"], record["label"], record["score"], json.dumps(record["top_k"], ensure_ascii=False)]
        )
    return count


def main(argv):
    args = parse_args(argv)
    # Heavy imports wait until the arguments are checked, so that a mistyped flag is answered at once.
    import torch
    from tqdm.auto import tqdm

    from imgft.args import ModelArguments
    from imgft.model import load_saved_classifier
    from imgft.transforms import build_transforms, normalizer
    from imgft.tta import views_transform

    files, problems, skipped_files = find_images(args.paths)
    for path, reason in skipped_files:
        print(f"warning: skipping {path}: {reason}", file=sys.stderr)
    for pattern, reason in problems:
        print(f"warning: {pattern}: {reason}", file=sys.stderr)
    if not files:
        passed_over = f" ({len(skipped_files)} files that are not images, named above)" if skipped_files else ""
        raise UserError(f"no images found in {', '.join(args.paths)}{passed_over}")
    model_args = ModelArguments(
        model_name_or_path=args.model_name_or_path,
        image_processor_name=args.image_processor_name,
        cache_dir=args.cache_dir,
        model_revision=args.model_revision,
        trust_remote_code=args.trust_remote_code,
    )
    model, image_processor = load_saved_classifier(model_args)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    transform = build_transforms(image_processor, None, False, 1.0)[1]
    if args.tta:
        transform = views_transform(transform, args.tta)
    normalize = normalizer(image_processor)

    progress = tqdm(total=len(files), unit="image", disable=len(files) < PROGRESS_MIN_IMAGES, file=sys.stderr)
    with progress:
        records = predict_files(
            model,
            transform,
            normalize,
            files,
            args.per_device_eval_batch_size,
            args.top_k,
            progress,
            with_views=args.tta is not None,
        )
        labelled = write_records(records, args.output)
    unreadable = len(files) - labelled
    skipped = [f"{unreadable} unreadable"] if unreadable else []
    if skipped_files:
        skipped.append(f"{len(skipped_files)} non-image file(s)")
    summary = f"Labelled {labelled} image(s)" + (f", skipped {' and '.join(skipped)}" if skipped else "")
    print(summary + (f"; wrote {args.output}" if args.output else ""), file=sys.stderr)
    if not labelled:
        raise UserError("none of the images could be read")
