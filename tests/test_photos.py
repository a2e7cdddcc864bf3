"""Bundled photos and upload validation."""
import numpy as np
import pytest
from PIL import Image

from cait.data.photos import DISPLAY_SIDE, ImageError, SAMPLE_PHOTOS, load_image, preprocess, sample_photo


def test_every_bundled_photo_loads_as_rgb():
    for name in SAMPLE_PHOTOS:
        img = sample_photo(name)
        assert img.mode == "RGB" and min(img.size) >= 200


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK", "1"])
def test_modes_become_rgb(mode, tmp_path):
    img = Image.new(mode, (40, 30))
    path = tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (40, 30)


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    assert load_image(img).getpixel((0, 0)) == (255, 255, 255)


def test_arrays():
    assert load_image(np.zeros((20, 30), np.uint8)).size == (30, 20)
    assert load_image(np.ones((20, 30, 1), np.float32)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageError, match="must be"):
        load_image(np.zeros((20, 30, 2), np.uint8))


def test_large_images_are_downscaled_huge_ones_refused(tmp_path):
    assert max(load_image(Image.new("RGB", (3000, 1500))).size) == DISPLAY_SIDE
    path = tmp_path / "huge.png"
    Image.new("1", (8000, 6000)).save(path)                     # 48 MP, tiny file: refused from the header
    with pytest.raises(ImageError, match="too large"):
        load_image(path)


def test_non_images_and_tiny_images_are_refused(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(ImageError, match="notes.png: not an image"):
        load_image(path)
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64)).save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(truncated)
    with pytest.raises(ImageError, match="too small"):
        load_image(Image.new("RGB", (4, 100)))
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.jpg")


def test_preprocess_matches_model_input(tiny):
    x = preprocess(tiny(), [sample_photo(next(iter(SAMPLE_PHOTOS)))] * 2)
    assert x.shape == (2, 3, 32, 32)
