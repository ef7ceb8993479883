"""Which files under a folder are images: the one rule that training's class folders, check-data and predict share.

Links are followed, to files and to folders (`ln -s /data/raw/cats train/cats` is a class, as it is for
torchvision's ImageFolder); a folder reached a second time, through a link loop or a second link to it, is
read once, at the first path that reaches it, and the later paths are named. Hidden files and folders
(.DS_Store, ._photo.jpg) and macOS __MACOSX leftovers are passed over quietly, and so are imagefolder metadata
files (metadata.csv, .jsonl, .parquet), which describe images rather than being ones. Every other file is an
image if PIL can open it: by its extension when this PIL reads that format (.avif where the AVIF plugin is
built in), else by its header, so files without an extension count too. What is left is skipped, and named
with the reason: notes, and photos in a format this PIL has no plugin for (.heic).
"""

import functools
import os
import warnings

from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image, ImageFile

METADATA_FILENAMES = frozenset(ImageFolder.METADATA_FILENAMES)
# Photo formats a PIL may lack a reader for: the reason for skipping one names its format.
PLUGIN_FORMATS = {".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF", ".jxl": "JPEG XL"}
NAMED_SKIPPED = 10  # a summary of skipped files names this many, then counts the rest


def visible_files(folder):
    """(files, repeats): every visible file under `folder`, sorted, links followed; and [(path, why)] for each
    folder passed over because its real folder was read already, at another path (each is read once)."""
    files, repeats = [], []
    read_at = {os.path.realpath(folder): folder}
    for root, folders, names in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(folders):
            if name.startswith(".") or name == "__MACOSX":
                continue
            path = os.path.join(root, name)
            real = os.path.realpath(path)
            if real in read_at:  # a link loop (os.walk would go round it until the path grew too long), or a twin
                repeats.append((path, f"a link to {real}, read already as {read_at[real]}"))
                continue
            read_at[real] = path
            kept.append(name)
        folders[:] = kept
        files += [os.path.join(root, name) for name in sorted(names) if not name.startswith(".")]
    return files, repeats


def is_metadata(path):
    return os.path.basename(path) in METADATA_FILENAMES


@functools.cache
def readable_extensions():
    """The extensions of the formats this PIL can decode: not those it only writes (.pdf), nor its stubs, which
    identify a format (HDF5, GRIB, BUFR, WMF) without a decoder to read it."""
    Image.init()
    return frozenset(
        extension
        for extension, name in Image.registered_extensions().items()
        if name in Image.OPEN and not _is_stub(Image.OPEN[name][0])
    )


def _is_stub(factory):
    return isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)


def skip_reason(path):
    """ "" for a file to read as an image, else why it is skipped. A file with an image extension is an image
    without being opened (the decode pass names it if it is unreadable); any other is opened, which reads
    its header only, and is an image if PIL identifies a format it can decode."""
    extension = os.path.splitext(path)[1].lower()
    if extension in readable_extensions():
        return ""
    if not os.path.isfile(path):  # a link to nothing, a pipe (opening one would wait for a writer)
        return "not a regular file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if not isinstance(image, ImageFile.StubImageFile):
                    return ""
    except Image.DecompressionBombError:
        return ""  # an image, too large to read: the decode pass says so
    except (OSError, ValueError, SyntaxError, EOFError):
        pass
    if extension in PLUGIN_FORMATS:
        return f"{PLUGIN_FORMATS[extension]} image, which this PIL has no plugin to read (convert it to JPEG or PNG)"
    return "not an image PIL can open"


def skipped_summary(skipped, where):
    """One line on `skipped` ([(path, reason)], paths relative to `where` where they lie under it): how many,
    how many of each extension, and the first NAMED_SKIPPED named with their reason."""
    extensions = {}
    for path, _ in skipped:
        extension = os.path.splitext(path)[1].lower() or "no extension"
        extensions[extension] = extensions.get(extension, 0) + 1
    kinds = ", ".join(f"{count} {extension}" for extension, count in sorted(extensions.items()))
    named = "; ".join(f"{_shown(path, where)} ({reason})" for path, reason in skipped[:NAMED_SKIPPED])
    more = f"; and {len(skipped) - NAMED_SKIPPED} more" if len(skipped) > NAMED_SKIPPED else ""
    return f"{len(skipped)} file(s) that are not images ({kinds}): {named}{more}"


def _shown(path, where):
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(where))
    return path if relative.startswith("..") else relative


def images_under(folder):
    """(image files under `folder`, [(skipped path, why)]), by `skip_reason`; a repeated folder is named among
    the skipped, metadata files are neither."""
    files, skipped = visible_files(folder)
    found = []
    for path in files:
        if is_metadata(path):
            continue
        reason = skip_reason(path)
        if reason:
            skipped.append((path, reason))
        else:
            found.append(path)
    return found, skipped
