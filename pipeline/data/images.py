"""The one image decoder every step uses: any common file to RGB uint8, or a short reason why not.

Files are only ever read. Truncated data raises (Pillow's ``LOAD_TRUNCATED_IMAGES`` is left False),
alpha is composited onto white, 16-bit grayscale is rescaled (not clipped), EXIF orientation is applied
and animations give their first frame. The pixel limit is the caller's ``max_pixels``, checked on every
open: Pillow's own decompression-bomb check (``Image.MAX_IMAGE_PIXELS``) is switched off, as it would
refuse a higher limit first (and warn on stderr).
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.configs import MAX_PIXELS  # the default limit: Pillow's decompression-bomb limit, ~89.5 Mpx
from pipeline.errors import choose

IMAGE_EXTENSIONS = ("bmp", "gif", "jpeg", "jpg", "png", "tif", "tiff", "webp")  # compare lower-cased
IGNORED_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", "__MACOSX"})
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}

_IGNORED_LOWER = frozenset(n.lower() for n in IGNORED_NAMES)
_MAGIC = {b"\xff\xd8": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"RIFF": "WEBP", b"BM": "BMP",
          b"II*\0": "TIFF", b"MM\0*": "TIFF"}
# What Pillow raises for undecodable data (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


class BadImage(Exception):
    """An image that cannot be decoded; the message is a short human reason."""


def is_hidden(name: str) -> bool:
    """True for a hidden or system file/folder name: dot-files (incl. ``._*``), Thumbs.db, __MACOSX, ..."""
    return name.startswith(".") or name.lower() in _IGNORED_LOWER


def load_rgb(source, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a path, bytes or uint8 array; raises :class:`BadImage`."""
    return np.array(_image(source, max_pixels))


def load_resized(source, size: int, interpolation: str = "bilinear", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """(size, size, 3) uint8: decoded then resized to exactly size x size (aspect not kept, no crop).

    Large JPEGs are decoded by libjpeg at a reduced scale that still covers the target (``draft``)."""
    resample = choose(interpolation, INTERPOLATIONS, "interpolation")
    im = _image(source, max_pixels, draft=(size, size))
    if im.size != (size, size):
        im = im.resize((size, size), resample)
    return np.array(im)


def check_image(path, max_pixels: int = MAX_PIXELS) -> str | None:
    """None if ``path`` decodes, else the reason it does not."""
    try:
        load_rgb(path, max_pixels)
    except BadImage as e:
        return str(e)
    return None


def check_header(path, max_pixels: int = MAX_PIXELS) -> str | None:
    """None if ``path`` opens as an image within the pixel limit (its header; its pixels are checked when they
    are decoded for the backbone), else the reason it does not."""
    try:
        w, h = _open(_read(path)).size
    except BadImage as e:
        return str(e)
    if w * h > max_pixels:
        return f"too large: {w}x{h} px > limit {max_pixels}"
    return None


def _image(source, max_pixels, draft=None) -> Image.Image:
    """An RGB Pillow image of a path, bytes or uint8 array."""
    if isinstance(source, np.ndarray):
        return _from_array(source)
    data = _read(source)
    im = _open(data)
    w, h = im.size
    if w * h > max_pixels:
        raise BadImage(f"too large: {w}x{h} px > limit {max_pixels}")
    if draft:
        im.draft("RGB", draft)  # JPEG only (a no-op otherwise); keeps the mode and at least ``draft`` pixels
    _load(im)
    return _to_rgb(_orient(im))


def _read(source) -> bytes:
    """All bytes of a path or bytes-like source (a file is opened read-only)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BadImage(f"unreadable: {e.strerror or e}") from None
    if not data:
        raise BadImage("empty file (0 bytes)")
    return data


def _open(data: bytes) -> Image.Image:
    """Pillow's lazy image (header only) of ``data``; its size is checked against ``max_pixels`` by the caller."""
    Image.MAX_IMAGE_PIXELS = None  # ours is the check (max_pixels): Pillow's would refuse a higher limit first
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage(f"not an image ({'text' if _looks_like_text(data[:512]) else 'unknown format'})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # only if the limit came back
        raise BadImage(f"too large: {e}") from None
    except _DECODE_ERRORS as e:  # headers cut short; a truncated WebP (Pillow decodes WebP on open)
        raise _decode_error(e, next((f for m, f in _MAGIC.items() if data.startswith(m)), "file")) from None


def _looks_like_text(head: bytes) -> bool:
    """No control bytes other than whitespace: a text file (or UTF-8 text)."""
    return all(b >= 32 or b in b"\t\n\r\f" for b in head)


def _load(im: Image.Image) -> None:
    """Decode all pixels (the first frame of an animation); truncated data raises."""
    try:
        im.load()
    except _DECODE_ERRORS as e:
        raise _decode_error(e, im.format) from None


def _decode_error(e: Exception, fmt: str) -> BadImage:
    """The reason for Pillow's error ``e`` on a ``fmt`` file: truncated or corrupt."""
    if isinstance(e, EOFError) or "truncated" in str(e).lower():
        return BadImage(f"truncated {fmt}")
    return BadImage(f"corrupt {fmt}: {e}")


def _orient(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; unreadable EXIF leaves the pixels as stored."""
    try:
        return ImageOps.exif_transpose(im)
    except (*_DECODE_ERRORS, KeyError, TypeError):
        return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB: 16/32-bit grayscale rescaled from 0..65535, transparency composited onto white."""
    if im.mode == "I" or im.mode.startswith("I;16"):
        return Image.fromarray(_rescale16(np.asarray(im))).convert("RGB")
    try:
        if im.has_transparency_data:
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
        return im.convert("RGB")
    except ValueError as e:
        raise BadImage(f"unsupported: mode {im.mode} ({e})") from None


def _rescale16(a: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded (65535 -> 255, 32768 -> 128)."""
    a = np.clip(a.astype(np.int64), 0, 65535)
    return ((a + 128) // 257).astype(np.uint8)


def _from_array(a: np.ndarray) -> Image.Image:
    """An RGB image of a uint8 (H, W, 3) or (H, W) array (in-memory datasets)."""
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise BadImage(f"unsupported: array {a.dtype} {a.shape}; need uint8 (H, W, 3) or (H, W)")
    return Image.fromarray(a).convert("RGB")
