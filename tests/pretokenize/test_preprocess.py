"""pretokenize.preprocess: identical to torchvision's Resize(res) + CenterCrop on PIL images
(the Meissonic/aMUSEd trainers' transform), EXIF, alpha, seeded random crops."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from pretokenize import geometry as G
from pretokenize import preprocess as P


def jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("w,h,res", [(300, 200, 64), (77, 130, 64), (64, 64, 64), (513, 1000, 256)])
def test_matches_torchvision_resize_center_crop(w, h, res):
    rng = np.random.default_rng(w * h)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    expect = np.asarray(transforms.Compose([
        transforms.Resize(res, interpolation=transforms.InterpolationMode.BILINEAR), transforms.CenterCrop(res)
    ])(img))
    got = P.prepare(png(img), res)
    assert np.array_equal(got.pixels, expect)
    assert (got.orig_w, got.orig_h) == (w, h)
    assert G.resized_size(w, h, res) == tuple(reversed(transforms.Resize(res)(img).size[::-1]))


def test_crop_offsets_are_in_resized_coordinates():
    p = P.prepare(png(Image.new("RGB", (400, 200))), 100)
    assert G.resized_size(400, 200, 100) == (200, 100)
    assert (p.crop_top, p.crop_left) == (0, 50)


def test_no_upscaling_unless_allowed():
    small = png(Image.new("RGB", (50, 40)))
    with pytest.raises(G.TooSmall, match="shorter side 40 < 64"):
        P.prepare(small, 64)
    assert P.prepare(small, 64, allow_upscale=True).pixels.shape == (64, 64, 3)


def test_random_crop_seeded_and_in_bounds():
    a = {G.crop_offsets(300, 100, 100, "random", P.crop_seed(0, "00000", f"k{i}")) for i in range(50)}
    assert all(t == 0 and 0 <= l <= 200 for t, l in a) and len(a) > 10
    s = P.crop_seed(3, "00001", "000010007")
    assert G.crop_offsets(300, 100, 100, "random", s) == G.crop_offsets(300, 100, 100, "random", s)
    assert P.crop_seed(3, "00001", "a") != P.crop_seed(3, "00001", "b") != P.crop_seed(4, "00001", "b")
    with pytest.raises(ValueError, match="crop must be"):
        G.crop_offsets(10, 10, 10, "diag")


def test_prepare_decodes_with_the_one_safe_decoder():
    """pretokenize decodes through core.image: the pixel cap is read from the header, so a
    bomb is refused before it is decoded (the EXIF/alpha/16-bit cases: tests/core/test_image.py)."""
    from core.image import DecodeError

    big = np.zeros((300, 400, 3), np.uint8)
    with pytest.raises(DecodeError, match="too many pixels: 400x300 > max_pixels=1000"):
        P.prepare(jpeg(big), 32, max_pixels=1000)
    assert P.prepare(jpeg(big), 32).pixels.shape == (32, 32, 3)


def test_prepare_and_unit_tensor():
    arr = np.full((40, 60, 3), 255, np.uint8)
    p = P.prepare(jpeg(arr), 32)
    assert p.pixels.shape == (32, 32, 3) and p.pixels.dtype == np.uint8
    x = P.to_unit_tensor(np.stack([p.pixels]))
    assert tuple(x.shape) == (1, 3, 32, 32) and float(x.max()) <= 1.0 and float(x.min()) > 0.9
    assert x.is_contiguous()  # NCHW, as the encoder is benchmarked, not channels-last strides
    with pytest.raises(Exception):
        P.prepare(b"not an image", 32)
