"""Reading real-world image files: a verdict on each file up front, and the one conversion to RGB.

Real folders hold zero-byte and truncated files, CMYK JPEGs, 16-bit PNGs, palette images with
transparency, rotated phone photos and decompression bombs. Unreadable files are found once, by a
cached `datasets.map` pass, and left out with their reason; readable ones are converted by `to_rgb`,
the rule training, evaluation, predict and the model card's loader share.
"""

import hashlib
import inspect
import io
import os
import statistics
import warnings

import datasets
import numpy as np
from datasets.fingerprint import Hasher
from PIL import Image, ImageOps

ERROR_COLUMN = "imgft_error"
PATH_COLUMN = "imgft_path"


# The one conversion every image goes through, in training, evaluation, predict and the reports, and the model
# card's loader: the card carries this function's source (report/model_card.py), so it must use only np and Image.
def to_rgb(image):
    """`image` (a PIL image of any mode) as 8-bit RGB, as the model saw its images in training:

    - 16-bit greyscale (modes I;16 and I) is scaled from 0-65535 to 0-255 (an I image that holds only values up to
      255 is taken as 8-bit), and float greyscale (F) from 0-1, or 0-255 if it goes higher. PIL's convert("RGB")
      clips them instead, which turns a 16-bit image almost white.
    - Transparent pixels (RGBA, LA, or a palette or other image with a transparent colour) are blended by their
      opacity onto a plain background: white, or black where the visible pixels are light (their mean brightness,
      weighted by opacity, above half), so that a light drawing on a transparent background stays visible. What
      a file stores under its transparent pixels never shows.
    - Any other image (CMYK, greyscale, 1-bit, palette) is PIL's convert("RGB").
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            full_scale = 1.0 if pixels.max(initial=0) <= 1.0 else 255.0
        elif image.mode == "I" and pixels.max(initial=0) <= 255:
            full_scale = 255.0
        else:
            full_scale = 65535.0
        return Image.fromarray(np.clip(pixels / full_scale * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        opacity = np.asarray(rgba.getchannel("A"), dtype=np.uint32)
        brightness = np.asarray(rgba.convert("L"), dtype=np.uint32)  # convert("L") ignores the alpha
        light = 2 * int((brightness * opacity).sum()) > 255 * int(opacity.sum())
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255) if light else (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path=None, data=None, draft_size=None):
    """Fully decode one file (first frame, EXIF orientation applied); raise on anything unreadable.

    PIL's decompression-bomb warning is an error here, and truncated files are never padded with grey
    (LOAD_TRUNCATED_IMAGES stays off). With `draft_size`, a JPEG is decoded at the smallest DCT scale
    (1/2, 1/4 or 1/8) that keeps both sides at least that large: the whole file is still read, so
    truncation is still caught, at a fraction of the cost.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data) if data is not None else path)
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
    if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation
        image = ImageOps.exif_transpose(image)
    return image


def _read(path, data):
    if data is None:
        with open(path, "rb") as file:
            data = file.read()
    return data


def _reason(err):
    """A short, user-facing reason for an exception raised while reading an image."""
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"larger than PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels"
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image PIL can identify"
    if isinstance(err, OSError) and err.filename:
        return f"cannot read the file: {err.strerror}"
    return f"cannot decode: {err}"  # truncated data, broken streams


DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


def decode_file(path=None, data=None, draft_size=None, rgb=False):
    """(image, "") for a readable file (converted `to_rgb` with `rgb`), else (None, why it is unreadable).

    `data` is the file's bytes when the dataset holds them; `draft_size` as in `open_image`.
    """
    try:
        data = _read(path, data)
        if not data:
            return None, "empty file (0 bytes)"
        image = open_image(data=data, draft_size=draft_size)
        return (to_rgb(image) if rgb else image), ""
    except DECODE_ERRORS as err:
        return None, _reason(err)


def decode_value(value):
    """(RGB image, "") or (None, why it is unreadable) for an image as a dataset holds it: a PIL image, the
    bytes of a file, or an undecoded Image feature's {"bytes", "path"} (a path that is no local file, such as
    a remote one, is read by datasets)."""
    if isinstance(value, Image.Image):
        return to_rgb(value), ""
    if isinstance(value, bytes):
        return decode_file(data=value, rgb=True)
    data, path = value.get("bytes"), value.get("path")
    if data is not None or (path and os.path.exists(path)):
        return decode_file(path, data, rgb=True)
    try:
        return to_rgb(datasets.Image().decode_example(value)), ""
    except DECODE_ERRORS as err:
        return None, _reason(err)


def inspect_file(path=None, data=None):
    """(reason or "", width, height, sha1 of the bytes) for one file; reason is "" for a readable image."""
    try:
        data = _read(path, data)
    except OSError as err:
        return _reason(err), 0, 0, ""
    image, reason = decode_file(data=data)
    digest = hashlib.sha1(data).hexdigest()
    return (reason, 0, 0, digest) if image is None else ("", image.width, image.height, digest)


def shrink_file(path=None, data=None, stored_size=None):
    """(uncompressed PPM bytes of the image as RGB, its shortest edge at most `stored_size`, or None; reason or "")."""
    image, reason = decode_file(path, data, draft_size=stored_size, rgb=True)
    if image is None:
        return None, reason
    shortest = min(image.size)
    if shortest > stored_size:
        scale = stored_size / shortest
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC, reducing_gap=3.0)
    buffer = io.BytesIO()
    # Uncompressed (PPM: a header, then the RGB bytes), because it is read back every epoch: at 74 px a PNG
    # took 227 us to decode and this 27 us (measured), for about 1.5x the bytes of a fast-compressed PNG.
    image.save(buffer, "PPM")
    return buffer.getvalue(), ""


def _shrink_batch(batch, image_column, stored_size):
    stored = []
    reasons = []
    paths = []
    for value in batch[image_column]:
        content, reason = shrink_file(value.get("path"), value.get("bytes"), stored_size)
        # The path stays beside the stored bytes (which are what is read) so that a report can name the file.
        stored.append({"bytes": content, "path": value.get("path")} if content else None)
        reasons.append(reason)
        paths.append(value.get("path") or "")
    return {image_column: stored, ERROR_COLUMN: reasons, PATH_COLUMN: paths}


def resize_once(split_dataset, image_column, stored_size, num_proc=None):
    """The split with every image decoded once and stored shrunk, plus ERROR_COLUMN/PATH_COLUMN verdicts.

    One `datasets.map` does both the unreadable-file check and the resize, and its Arrow output is cached
    under the dataset's fingerprint, `stored_size` and the code that stores the images: later epochs read
    small uncompressed images instead of camera JPEGs, and later runs on the same data skip the pass entirely.
    """
    undecoded = split_dataset.cast_column(image_column, datasets.Image(decode=False))
    features = undecoded.features.copy()
    features[image_column] = datasets.Image()
    features[ERROR_COLUMN] = datasets.Value("string")
    features[PATH_COLUMN] = datasets.Value("string")
    # datasets keys a map's cache by its function's name, not its code (measured: a changed `to_rgb` left the key
    # as it was), so images stored by another version of the conversion would be read back: the key holds the code.
    storing = (resize_once, _shrink_batch, shrink_file, decode_file, open_image, to_rgb)
    storing_code = [inspect.getsource(function) for function in storing]
    return undecoded.map(
        _shrink_batch,
        fn_kwargs={"image_column": image_column, "stored_size": stored_size},
        batched=True,
        batch_size=32,
        features=features,
        num_proc=worth_processes(num_proc, undecoded, image_column),
        new_fingerprint=Hasher.hash([undecoded._fingerprint, stored_size, storing_code]),
        desc=f"Decoding images once, stored at {stored_size} px",
    )


def worth_processes(num_proc, undecoded, image_column, bytes_per_process=32 * 2**20, sample_rows=32):
    """How many processes the decode pass gets: up to `num_proc`, each with at least `bytes_per_process`
    of image files to read (estimated from the first rows), since a process takes about a second to start,
    the time it takes to decode ~100 MB of JPEG; None (this process alone) below two.

    Measured: 1,797 digit PNGs (0.5 MB) ran slower in 2 processes than in one; 320 camera JPEGs (214 MB)
    ran faster."""
    rows = len(undecoded)
    if not num_proc or num_proc < 2 or not rows:
        return None
    sample = undecoded[: min(rows, sample_rows)][image_column]
    estimated_bytes = statistics.mean(_file_bytes(value) for value in sample) * rows
    processes = min(num_proc, int(estimated_bytes // bytes_per_process))
    return processes if processes > 1 else None


def _file_bytes(value):
    if value.get("bytes") is not None:
        return len(value["bytes"])
    try:
        return os.path.getsize(value["path"])
    except (OSError, TypeError):  # missing or unnamed: the decode pass will say why
        return 0


def _inspect_batch(batch, image_column):
    columns = {ERROR_COLUMN: [], PATH_COLUMN: [], "width": [], "height": [], "sha1": []}
    for value in batch[image_column]:
        reason, width, height, digest = inspect_file(value.get("path"), value.get("bytes"))
        for name, item in zip(columns, (reason, value.get("path") or "", width, height, digest), strict=True):
            columns[name].append(item)
    return columns


def inspect_images(split_dataset, image_column, num_proc=None):
    """One row per image: its unreadable reason ("" if fine), path, size and content hash.

    One decode of every file, as a `datasets.map` whose result is cached under the dataset's
    fingerprint: a second run on the same data reads the cache, and so does training after `check-data`
    when --resize_once is off (with it on, training's check is the `resize_once` pass instead).
    """
    undecoded = split_dataset.cast_column(image_column, datasets.Image(decode=False))
    return undecoded.map(
        _inspect_batch,
        fn_kwargs={"image_column": image_column},
        batched=True,
        batch_size=64,
        remove_columns=undecoded.column_names,
        num_proc=worth_processes(num_proc, undecoded, image_column),
        desc="Checking images",
    )
