"""pretokenize.geometry: the micro-conditions of a crop are those of the ORIGINAL image, whatever
the download did (rescale, center crop, border), checked against upstream's process_image
(torchvision Resize(res) + crop) applied to the original itself."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from pretokenize import geometry as G
from pretokenize import preprocess as P

RES = 64


def original(w: int, h: int) -> Image.Image:
    """A smooth picture (so resampling differences stay small), (h, w) pixels."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([255 * xx / w, 255 * yy / h, 128 + 100 * np.sin(xx / 17.0) * np.cos(yy / 23.0)], -1)
    return Image.fromarray(arr.astype(np.uint8))


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def upstream(img: Image.Image, res: int, top: int, left: int) -> np.ndarray:
    """Meissonic's process_image: Resize(res) (shorter side), then a res x res crop at (top, left)."""
    resized = transforms.Resize(res, interpolation=transforms.InterpolationMode.BILINEAR)(img)
    return np.asarray(resized.crop((left, top, left + res, top + res)), dtype=np.float64)


def download(img: Image.Image, mode: str, size: int) -> Image.Image:
    """img2dataset's resize modes (albumentations SmallestMaxSize/CenterCrop, LongestMaxSize/PadIfNeeded)."""
    w, h = img.size
    if mode == "keep_ratio":
        s = size / min(w, h)
        return img.resize((round(w * s), round(h * s)), Image.BILINEAR)
    if mode == "center_crop":
        s = size / min(w, h)
        sw, sh = round(w * s), round(h * s)
        scaled = img.resize((sw, sh), Image.BILINEAR)
        top, left = (sh - size) // 2, (sw - size) // 2
        return scaled.crop((left, top, left + size, top + size))
    s = size / max(w, h)  # border
    bw, bh = round(w * s), round(h * s)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(img.resize((bw, bh), Image.BILINEAR), ((size - bw) // 2, (size - bh) // 2))
    return canvas


@pytest.mark.parametrize("w,h", [(1024, 768), (300, 200), (200, 300), (960, 480), (640, 640)])
@pytest.mark.parametrize("mode", ["keep_ratio", "center_crop", "border"])
def test_micro_conditions_are_the_originals_and_the_pixels_match_upstream(w, h, mode):
    orig = original(w, h)
    stored = download(orig, mode, 128)
    source = G.DOWNLOAD_MODES[mode]
    got = P.prepare(png(stored), RES, orig=(w, h), source=source)
    assert (got.orig_w, got.orig_h) == (w, h)
    frame = G.resized_size(w, h, RES)
    if mode == "center_crop":  # the only crop left: the download's square, in the res frame
        want = (round((round(h * 128 / min(w, h)) - 128) // 2 * RES / 128),
                round((round(w * 128 / min(w, h)) - 128) // 2 * RES / 128))
    else:  # centre of the original's res frame, as upstream's CenterCrop
        want = (G.center_offset(frame[1], RES), G.center_offset(frame[0], RES))
    assert (got.crop_top, got.crop_left) == want
    ref = upstream(orig, RES, got.crop_top, got.crop_left)
    assert np.abs(got.pixels.astype(np.float64) - ref).mean() < 4.0  # same content, resampled twice


def test_too_small_is_judged_on_both_the_original_and_the_stored_pixels():
    small = original(300, 200)
    with pytest.raises(G.TooSmall, match="shorter side 200 < 256"):
        G.plan((300, 200), (300, 200), 256)
    # big original, but the download kept only 128 px: no pixels for a 256 crop either
    with pytest.raises(G.TooSmall, match="shorter side 128 < 256"):
        G.plan((192, 128), (3000, 2000), 256)
    with pytest.raises(G.TooSmall):
        G.plan((128, 128), (3000, 2000), 256, "center_crop")
    plan = G.plan((300, 200), (300, 200), 256, allow_upscale=True)
    assert plan.frame == (384, 256) and plan.orig == (300, 200)
    assert P.prepare(png(small), 256, allow_upscale=True).pixels.shape == (256, 256, 3)


def test_source_inference_without_a_record():
    assert G.source_of((128, 96), (1024, 768), "auto") == "rescale"
    assert G.source_of((128, 128), (1024, 768), "auto") == "center_crop"  # img2dataset's square output
    assert G.source_of((128, 128), (1024, 768), "border") == "border"
    assert G.source_of((300, 200), (300, 200), "center_crop") == "rescale"  # left at its own size


def test_an_exif_turned_image_keeps_its_shape_and_a_wrong_size_is_not_trusted():
    # img2dataset records the size before EXIF orientation; the decoder turns the image upright
    upright = original(96, 160)
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", exif=_orientation(6), quality=95)
    prep = P.prepare(buf.getvalue(), RES, orig=(160, 96))  # the .json: 160x96, as stored before turning
    assert (prep.orig_w, prep.orig_h) == (96, 160) and prep.note[0] == "orig_size_rotated"
    want = upstream(upright, RES, prep.crop_top, prep.crop_left)
    assert np.abs(prep.pixels.astype(np.float64) - want).mean() < 3  # not squashed into a 106x64 frame
    # a size no download mode makes this image from: the image is its own original, and it is said
    for orig in ((80, 96), (2_000_000_000, 96), (200_000, 96)):
        plan = G.plan((160, 96), orig, RES)
        assert plan.orig == (160, 96) and plan.frame == (106, 64) and plan.note[0] == "orig_size_mismatch"
    assert G.plan((160, 96), (1600, 960), RES).note is None  # a plain rescale
    assert G.plan((128, 128), (1024, 768), RES).note is None  # img2dataset's center crop


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()
