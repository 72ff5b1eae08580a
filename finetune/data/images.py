"""Decode any image a user has into the 8-bit RGB array the backbones expect.

Grayscale, 16-bit, palette (with transparency), RGBA and CMYK files all end up as HxWx3 uint8;
EXIF orientation is applied so a phone photo is seen upright, as the user sees it.
"""

from __future__ import annotations

import errno
import math
import os
import stat

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from finetune.errors import FinetuneError

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class BadImageError(FinetuneError):
    """A file that cannot be decoded as an image."""

    def __init__(self, path: str, reason: str | None = None):
        if reason is None:  # rebuilt from one message by torch's DataLoader after a worker raised it
            super().__init__(path.rsplit("BadImageError: ", 1)[-1].strip())
            self.path, self.reason = None, None
            return
        super().__init__(
            f"Could not read image {path}: {reason}. Replace or remove the file "
            f"(training checks files first: data.on_bad_file=skip leaves such files out and lists them)."
        )
        self.path, self.reason = path, reason


def _open_regular(path: str):
    """A binary file object for ``path`` when it is a regular file. Opened non-blocking, so a FIFO named
    x.jpg fails here instead of hanging the loader; a folder named x.jpg fails too."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{'a folder' if stat.S_ISDIR(mode) else 'not a regular file'}, not an image file")
    return os.fdopen(fd, "rb")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become white, 16-bit is scaled to 8-bit."""
    if im.mode == "F":  # float images (TIFF): 0..1 scaled up, anything larger clipped to 8 bits
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        im = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8))
    if im.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(im, dtype=np.float64)
        scale = 257.0 if arr.max(initial=0) > 255 or im.mode != "I" else 1.0
        im = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB") if im.mode != "RGB" else im


def load_image(path: str, max_side: int | None = None) -> np.ndarray:
    """Decode ``path`` to HxWx3 uint8, optionally shrinking so the shorter side is <= ``max_side``.

    A JPEG larger than that is decoded at a reduced scale (1/2, 1/4 or 1/8, never below the size
    asked for: libjpeg's DCT scaling, via PIL's draft mode) before the exact resize: several times
    faster for camera photos."""
    try:
        with _open_regular(path) as f, Image.open(f) as im:
            if max_side is not None and min(im.size) > 2 * max_side:
                ratio = max_side / min(im.size)
                im.draft(im.mode, (math.ceil(im.width * ratio), math.ceil(im.height * ratio)))
            im = ImageOps.exif_transpose(im)
            im = to_rgb(im)
            if max_side is not None and min(im.size) > max_side:
                ratio = max_side / min(im.size)
                im = im.resize((max(1, round(im.width * ratio)), max(1, round(im.height * ratio))), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        if isinstance(e, OSError) and e.strerror:
            reason = e.strerror if e.errno != errno.ENOENT or not os.path.islink(path) else "dangling symlink"
        else:
            reason = str(e) or type(e).__name__
        raise BadImageError(path, reason) from None
