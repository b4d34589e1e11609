"""Reading photos for prediction: any file Pillow opens becomes an RGB uint8 array, or one clear error.

What is handled: EXIF orientation (phones store portrait photos sideways), 16-bit and 32-bit
greyscale (scaled to 8 bits, not clipped as Pillow's ``convert`` does), transparency (composited
on white), CMYK / palette / YCbCr / LAB (converted by Pillow), multi-frame files (first frame).
What is refused, as ``InputError`` naming the file: a missing or empty file, a file that is not an
image, a truncated or corrupt image, and an image above ``MAX_PIXELS`` (decompression bombs: a few
kilobytes of PNG can claim billions of pixels).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["InputError", "MAX_PIXELS", "IMAGE_SUFFIXES", "load_image", "decode_image", "to_rgb_array",
           "find_images"]

# Pillow's own default limit (~89.5 Mpx, a 9459 x 9459 image); larger images are refused.
MAX_PIXELS = 89_478_485
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm", ".pbm", ".jfif"})


class InputError(ValueError):
    """An input (image or video) that cannot be used; the message names the file, on one line."""


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB uint8 ``(H, W, 3)``, upright (EXIF orientation applied)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")
    return decode_image(path, str(path), max_pixels)


def decode_image(source: str | os.PathLike | BinaryIO, name: str,
                 max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file or binary file object (e.g. ``io.BytesIO`` of an upload) as upright
    RGB uint8 ``(H, W, 3)``; an ``InputError`` names it ``name``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
            with Image.open(source) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise InputError(
                        f"{name}: image of {width}x{height} = {width * height / 1e6:.0f} Mpx is above "
                        f"the {max_pixels / 1e6:.0f} Mpx limit (decompression-bomb guard)")
                image.load()
                return to_rgb_array(image)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as exc:  # Pillow's own hard limit (2x its default)
        raise InputError(f"{name}: image above the {max_pixels / 1e6:.0f} Mpx limit "
                         f"(decompression-bomb guard; {' '.join(str(exc).split())})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow's decoders raise all three
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"{name}: truncated or corrupt image ({reason})") from None


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """A Pillow image of any mode as upright RGB uint8 ``(H, W, 3)``."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return np.repeat(_wide_to_uint8(np.asarray(image), image.mode)[..., None], 3, axis=2)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def _wide_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit / 32-bit / float greyscale to 8 bits over the full range (Pillow's ``convert`` clips)."""
    peak = float(values.max(initial=0))
    values = values.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and peak > 255):
        values = values / 257.0  # 0..65535 -> 0..255 (65535 / 257 = 255 exactly)
    elif mode == "F" and peak <= 1.0:
        values = values * 255.0  # float images in 0..1
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def find_images(folder: str | os.PathLike) -> Iterator[Path]:
    """Image files below ``folder`` (recursive, by suffix), in sorted order; hidden files skipped."""
    root = Path(folder)
    for path in sorted(root.rglob("*")):
        if (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in path.relative_to(root).parts)):
            yield path
