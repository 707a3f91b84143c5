"""The shared decoder: every awkward file decodes to correct RGB or raises BadImage with a reason."""

import hashlib
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from pipeline import configs
from pipeline.data import images
from pipeline.data.images import BadImage, check_image, load_resized, load_rgb
from pipeline.errors import PipelineError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def noise(w, h, seed=0):
    """A smooth random RGB image (blocky noise upsampled), like a photo to JPEG."""
    small = np.random.default_rng(seed).integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def save(path, im, **kw):
    im.save(path, **kw)
    return path


def png16_rgb(values):
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one) of an (H, W, 3) uint16 array."""
    h, w, _ = values.shape

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def pillow(path, what=lambda im: im.convert("RGB")):
    """``what`` of Pillow's own reading of ``path`` (the file closed after)."""
    with Image.open(path) as im:
        return what(im)


def assert_rgb(a, shape):
    assert a.dtype == np.uint8 and a.shape == shape


# --- files that must be rejected, with a reason ---------------------------------------------------------

def test_zero_byte_file_is_empty(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadImage, match=r"empty file \(0 bytes\)"):
        load_rgb(tmp_path / "empty.jpg")


def test_text_named_jpg_is_not_an_image(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    assert check_image(tmp_path / "notes.jpg") == "not an image (text)"
    assert check_image(b"\x00\x01\x02junk" * 20) == "not an image (unknown format)"


@pytest.mark.parametrize("keep", [0.5, 0.9])  # cut in the headers / in the pixel data
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_raises_instead_of_padding_grey(tmp_path, fmt, keep):
    raw = io.BytesIO()
    noise(256, 192).save(raw, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(raw.getvalue()[: int(len(raw.getvalue()) * keep)])
    with pytest.raises(BadImage, match=f"truncated {fmt}"):
        load_rgb(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_oversized_rejected_before_decoding(tmp_path, monkeypatch):
    path = save(tmp_path / "big.png", noise(100, 80))
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an oversized image"))
    assert check_image(path, max_pixels=5000) == "too large: 100x80 px > limit 5000"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_our_limit_not_pillows_decides(tmp_path, monkeypatch, fmt):
    """A max_pixels above Pillow's own limit is honoured (Pillow's limit made tiny to stand for a big image):
    no DecompressionBombError, no warning; our limit still refuses what is above it."""
    path = save(tmp_path / f"big.{fmt.lower()}", noise(100, 80), format=fmt)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would raise at open beyond twice this
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail here
        assert load_rgb(path, max_pixels=8000).shape == (80, 100, 3)
        assert load_resized(path, 16, max_pixels=8000).shape == (16, 16, 3)
        assert check_image(path, max_pixels=8000) is None
    assert check_image(path, max_pixels=7999) == "too large: 100x80 px > limit 7999"


def test_unknown_array_kind_is_rejected():
    with pytest.raises(BadImage, match="unsupported: array float64"):
        load_resized(np.zeros((8, 8, 3)), 4)


# --- files that must decode to correct RGB ---------------------------------------------------------------

def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    path = save(tmp_path / "cmyk.jpg", Image.new("RGB", (32, 24), (200, 30, 30)).convert("CMYK"), quality=95)
    assert pillow(path, lambda im: im.mode) == "CMYK"
    a = load_rgb(path)
    assert_rgb(a, (24, 32, 3))
    assert np.abs(a.astype(int) - (200, 30, 30)).max() <= 4


def test_16bit_grayscale_png_is_rescaled_not_clipped(tmp_path):
    ramp = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(3, axis=0)
    path = save(tmp_path / "deep.png", Image.fromarray(ramp))
    assert pillow(path, lambda im: im.mode) in ("I;16", "I")
    a = load_rgb(path)
    assert_rgb(a, (3, 4, 3))
    assert (a[..., 0] == a[..., 2]).all()
    assert a[0, 0, 0] == 0 and a[0, 1, 0] == 1 and abs(int(a[0, 2, 0]) - 128) <= 1 and a[0, 3, 0] == 255


def test_16bit_rgb_png_keeps_its_colours(tmp_path):
    values = np.array([[[65535, 32768, 0], [0, 0, 65535]]], dtype=np.uint16)
    path = tmp_path / "deep_rgb.png"
    path.write_bytes(png16_rgb(values))
    a = load_rgb(path).astype(int)
    assert np.abs(a - [[[255, 128, 0], [0, 0, 255]]]).max() <= 1


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_onto_white(tmp_path, mode):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 255  # red (grey 76 in LA)
    rgba[:, :2, 3] = 0  # transparent
    rgba[:, 2:4, 3] = 128  # half
    rgba[:, 4:, 3] = 255  # opaque
    path = save(tmp_path / "alpha.png", Image.fromarray(rgba, "RGBA").convert(mode))
    a = load_rgb(path).astype(int)
    opaque = a[0, 5]
    assert (a[:, :2] == 255).all()
    assert np.abs(a[0, 2] - (opaque * 128 + 255 * 127) / 255).max() <= 2


def test_palette_with_transparency_is_composited_onto_white(tmp_path):
    im = Image.new("P", (4, 2), 0)
    im.putpalette([*RED, *BLUE] + [0] * 762)
    im.putpixel((0, 0), 1)
    path = save(tmp_path / "pal.png", im, transparency=1)
    a = load_rgb(path)
    assert tuple(a[0, 0]) == WHITE
    assert tuple(a[1, 3]) == RED


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_and_bilevel_become_grey_rgb(tmp_path, mode):
    path = save(tmp_path / "gray.png", noise(20, 10).convert(mode))
    a = load_rgb(path)
    assert_rgb(a, (10, 20, 3))
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    assert (a[..., 0] == np.asarray(pillow(path, lambda im: im.convert("L")))).all()


@pytest.mark.parametrize("ext", ["gif", "webp"])
def test_animation_gives_first_frame(tmp_path, ext):
    frames = [Image.new("RGB", (20, 20), c) for c in (RED, BLUE)]
    path = tmp_path / f"anim.{ext}"
    frames[0].save(path, save_all=True, append_images=frames[1:], lossless=True)
    assert pillow(path, lambda im: im.n_frames) == 2
    assert np.abs(load_rgb(path).astype(int) - RED).max() <= 2


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), BLUE)
    im.paste(RED, (0, 0, 10, 20))  # red left band
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    a = load_rgb(save(tmp_path / "rot.jpg", im, exif=exif, quality=95))
    assert a.shape == (40, 20, 3)
    assert np.abs(a[2, 10].astype(int) - RED).max() < 40  # left band is now the top band
    assert np.abs(a[-2, 10].astype(int) - BLUE).max() < 40


def test_bytes_and_path_decode_the_same(tmp_path):
    path = save(tmp_path / "a.png", noise(30, 20))
    assert (load_rgb(path) == load_rgb(path.read_bytes())).all()
    assert (load_rgb(str(path)) == np.asarray(pillow(path))).all()
    assert check_image(path) is None


def test_loading_never_modifies_the_file(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path / "rot.jpg", noise(64, 48), exif=exif)
    before = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns
    load_rgb(path)
    load_resized(path, 16)
    check_image(path, max_pixels=10)
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) == before


# --- resizing ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("interpolation", sorted(images.INTERPOLATIONS))
@pytest.mark.parametrize("w, h, size", [(12, 9, 32), (120, 70, 32), (32, 32, 32)])
def test_load_resized_gives_exact_square(tmp_path, interpolation, w, h, size):
    path = save(tmp_path / "a.png", noise(w, h))
    assert_rgb(load_resized(path, size, interpolation), (size, size, 3))


def test_load_resized_accepts_uint8_arrays():
    rgb = np.asarray(noise(8, 8))
    assert_rgb(load_resized(rgb, 32), (32, 32, 3))
    gray = load_resized(rgb[..., 0].copy(), 32, "nearest")
    assert_rgb(gray, (32, 32, 3))
    assert (gray[::4, ::4, 1] == rgb[..., 0]).all()


@pytest.mark.parametrize("mode", ["RGB", "CMYK", "L"])
def test_jpeg_draft_matches_full_decode_and_resize(tmp_path, monkeypatch, mode):
    path = save(tmp_path / "photo.jpg", noise(1600, 1200).convert(mode), quality=90)
    decoded, real = [], JpegImagePlugin.JpegImageFile.draft

    def spy(self, *args):
        result = real(self, *args)
        decoded.append((self.mode, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    fast = load_resized(path, 100)
    assert decoded == [(mode, (200, 150))]  # libjpeg decodes at 1/8 scale, mode kept, still >= the target
    full = np.asarray(pillow(path).resize((100, 100), Image.Resampling.BILINEAR))
    assert_rgb(fast, (100, 100, 3))
    assert np.abs(fast.astype(int) - full).mean() < 3


def test_unknown_interpolation_lists_valid_names(tmp_path):
    path = save(tmp_path / "a.png", noise(8, 8))
    with pytest.raises(PipelineError, match="unknown interpolation 'cubic'; valid: area, bicubic, bilinear, "
                                            "lanczos, nearest"):
        load_resized(path, 4, "cubic")


# --- names ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, hidden", [(".DS_Store", True), ("Thumbs.db", True), ("thumbs.db", True),
                                          ("desktop.ini", True), ("__MACOSX", True), ("._cat.jpg", True),
                                          (".hidden", True), ("cat.jpg", False), ("Thumbs", False)])
def test_is_hidden(name, hidden):
    assert images.is_hidden(name) is hidden


def test_extensions_and_limit():
    assert set(images.IMAGE_EXTENSIONS) == {"jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff"}
    assert images.MAX_PIXELS == 89_478_485 == configs.MAX_PIXELS  # Pillow's default decompression-bomb limit
