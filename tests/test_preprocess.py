"""Parity of mgpo_jax's Qwen2.5-VL image preprocessing with transformers' Qwen2VLImageProcessorPil."""

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mgpo_jax.models.qwen2_5_vl.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageProcessorConfig,
    num_image_tokens,
    preprocess_image,
    preprocess_images,
    smart_resize,
)

hf_qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

QWEN_DEFAULT = ImageProcessorConfig()
MGPO = ImageProcessorConfig(min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
CONFIGS = {"qwen_default": QWEN_DEFAULT, "mgpo": MGPO}


def hf_processor(cfg):
    return hf_qwen2_vl.Qwen2VLImageProcessorPil(
        min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels,
        patch_size=cfg.patch_size,
        temporal_patch_size=cfg.temporal_patch_size,
        merge_size=cfg.merge_size,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
    )


def hf_preprocess(images, cfg=None, processor=None):
    out = (processor or hf_processor(cfg))(images, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def random_image(height, width, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None, "LA": 2, "CMYK": 4}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def assert_same(ours, ref):
    (pv, grid), (ref_pv, ref_grid) = ours, ref
    assert pv.dtype == np.float32 and pv.flags.c_contiguous
    assert grid.dtype == np.int64
    np.testing.assert_array_equal(grid, ref_grid)
    assert pv.shape == ref_pv.shape
    assert np.array_equal(pv, ref_pv), f"max abs diff {np.abs(pv - ref_pv).max()}"


SIZES = {
    "tiny_enlarged": (30, 40),
    "side_below_factor": (10, 1000),
    "wide_50x2000": (50, 2000),
    "tall_3000x60": (3000, 60),
    "multiple_of_28": (280, 560),
    "odd": (333, 517),
    "about_1000": (1001, 999),
    "large_4000x3000": (4000, 3000),  # shrunk by the MGPO bounds; under the Qwen defaults only rounded
}


@pytest.mark.parametrize(
    "size_name,cfg_name",
    # 4000x3000 is only rounded by the Qwen defaults; test_huge_image_shrunk_under_qwen_defaults covers those.
    [(s, c) for s in SIZES for c in CONFIGS if (s, c) != ("large_4000x3000", "qwen_default")],
)
def test_matches_transformers(size_name, cfg_name):
    cfg = CONFIGS[cfg_name]
    image = random_image(*SIZES[size_name], seed=len(size_name))
    pv, grid = preprocess_image(image, cfg)
    assert_same((pv, grid[None]), hf_preprocess(image, cfg))


def test_huge_image_shrunk_under_qwen_defaults():
    height, width = 4100, 3300  # 13.5 MP > max_pixels 12845056
    assert math.prod(smart_resize(height, width)) <= QWEN_DEFAULT.max_pixels < height * width
    image = random_image(height, width, seed=1)
    pv, grid = preprocess_image(image, QWEN_DEFAULT)
    assert_same((pv, grid[None]), hf_preprocess(image, QWEN_DEFAULT))


def _palette_with_transparency():
    image = random_image(100, 90, mode="L", seed=3).convert("P")
    image.info["transparency"] = 7
    return image


@pytest.mark.parametrize(
    "make_image",
    [
        pytest.param(lambda: random_image(123, 77, mode="RGBA", seed=4), id="RGBA"),
        pytest.param(lambda: random_image(123, 77, mode="L", seed=5), id="L"),
        pytest.param(lambda: random_image(60, 300, mode="LA", seed=6), id="LA"),
        pytest.param(lambda: random_image(64, 64, mode="CMYK", seed=7), id="CMYK"),
        pytest.param(_palette_with_transparency, id="P_transparency"),
    ],
)
def test_non_rgb_modes_match_transformers(make_image):
    image = make_image()
    pv, grid = preprocess_image(image, MGPO)
    assert_same((pv, grid[None]), hf_preprocess(image, MGPO))


def test_rgba_is_composited_on_white():
    rgba = np.zeros((56, 56, 4), np.uint8)  # fully transparent black
    pv, _ = preprocess_image(Image.fromarray(rgba, mode="RGBA"), QWEN_DEFAULT)
    white = (1.0 - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32)
    np.testing.assert_allclose(pv.reshape(-1, 3, 2 * 14 * 14), np.broadcast_to(white[:, None], (16, 3, 392)))


def test_batch_matches_transformers():
    images = [random_image(30, 40, seed=8), random_image(333, 517, mode="L", seed=9), random_image(2000, 50, seed=10)]
    for cfg in CONFIGS.values():
        pv, grid = preprocess_images(images, cfg)
        assert grid.shape == (3, 3)
        assert_same((pv, grid), hf_preprocess(images, cfg))
        assert_same(preprocess_images(images[1:2], cfg), hf_preprocess(images[1:2], cfg))


def test_non_default_patch_settings_match_transformers():
    cfg = ImageProcessorConfig(
        min_pixels=1000, max_pixels=50000, patch_size=8, temporal_patch_size=3, merge_size=3,
        image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3),
    )  # fmt: skip
    image = random_image(123, 301, seed=11)
    pv, grid = preprocess_image(image, cfg)
    assert pv.shape[1] == cfg.patch_dim == 3 * 3 * 8 * 8
    assert_same((pv, grid[None]), hf_preprocess(image, cfg))


def test_patch_layout():
    """Rows in 2x2 merge-block order, each row (C, T, py, px); checked without transformers."""
    height, width = 56, 84  # multiples of 28 inside the pixel bounds: no resampling
    image = random_image(height, width, seed=12)
    pv, grid = preprocess_image(image, QWEN_DEFAULT)
    np.testing.assert_array_equal(grid, [1, 4, 6])
    mean, std = np.float32(OPENAI_CLIP_MEAN), np.float32(OPENAI_CLIP_STD)
    normalized_HWC = ((np.asarray(image).astype(np.float64) / 255).astype(np.float32) - mean) / std
    expected = []
    for block_row in range(2):
        for block_col in range(3):
            for row in range(2):
                for col in range(2):
                    y, x = 14 * (2 * block_row + row), 14 * (2 * block_col + col)
                    patch_CYX = normalized_HWC[y : y + 14, x : x + 14].transpose(2, 0, 1)
                    expected.append(np.stack([patch_CYX, patch_CYX], axis=1).reshape(-1))  # (C, T, py, px)
    np.testing.assert_array_equal(pv, np.stack(expected))


def test_empty_batch():
    pv, grid = preprocess_images([], MGPO)
    assert pv.shape == (0, 1176) and pv.dtype == np.float32
    assert grid.shape == (0, 3) and grid.dtype == np.int64


def test_rejects_non_pil():
    with pytest.raises(TypeError, match="PIL"):
        preprocess_image(np.zeros((56, 56, 3), np.uint8), MGPO)


def test_num_image_tokens():
    assert num_image_tokens([1, 4, 6]) == 6
    assert isinstance(num_image_tokens(np.array([1, 4, 6])), int)
    np.testing.assert_array_equal(num_image_tokens(np.array([[1, 4, 6], [1, 36, 36]])), [6, 324])
    assert num_image_tokens([1, 6, 9], merge_size=3) == 6
    images = [random_image(30, 40, seed=13), random_image(333, 517, seed=14)]
    pv, grid = preprocess_images(images, MGPO)
    assert num_image_tokens(grid).sum() * 4 == pv.shape[0]
    with pytest.raises(ValueError, match="shape"):
        num_image_tokens([1, 4])


# smart_resize --------------------------------------------------------------------------------------------


def _hf_smart_resize(*args):
    try:
        return hf_qwen2_vl.smart_resize(*args)
    except ValueError as e:
        return ValueError, str(e)


def _our_smart_resize(*args):
    try:
        return smart_resize(*args)
    except ValueError as e:
        return ValueError, str(e)


@settings(max_examples=1000, deadline=None)
@given(
    height=st.integers(1, 20000),
    width=st.integers(1, 20000),
    factor=st.sampled_from([28, 32, 16]),
    pixel_bounds=st.tuples(st.integers(1, 4 * 10**6), st.integers(1, 2 * 10**7)).map(sorted),
)
@example(height=30, width=40, factor=28, pixel_bounds=(3136, 12845056))
@example(height=1, width=200, factor=28, pixel_bounds=(3136, 12845056))  # aspect exactly 200: allowed
@example(height=1, width=201, factor=28, pixel_bounds=(3136, 12845056))  # aspect above 200: rejected
@example(height=14, width=14, factor=28, pixel_bounds=(1, 100))  # rounds to 0 x 0 -> enlarged
@example(height=5, width=1000, factor=28, pixel_bounds=(200704, 1003520))  # side far below factor
def test_smart_resize_matches_transformers(height, width, factor, pixel_bounds):
    args = (height, width, factor, *pixel_bounds)
    assert _our_smart_resize(*args) == _hf_smart_resize(*args)


def test_smart_resize_properties_and_errors():
    assert smart_resize(1000, 1000) == (1008, 1008)  # defaults are the released Qwen2.5-VL bounds
    assert smart_resize(1000, 1000, 28, MGPO.min_pixels, MGPO.max_pixels) == (980, 980)
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        smart_resize(10, 2011)
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_image(random_image(3, 700), MGPO)
    for height, width in [(0, 10), (10, 0), (-5, 10)]:
        with pytest.raises(ValueError, match="positive"):
            smart_resize(height, width)


# ImageProcessorConfig ------------------------------------------------------------------------------------

RELEASED_JSON = {  # Qwen/Qwen2.5-VL-*-Instruct preprocessor_config.json
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


def _write_config(path, d):
    path.mkdir(parents=True, exist_ok=True)
    (path / "preprocessor_config.json").write_text(json.dumps(d))
    return path


def test_config_defaults_are_released_values():
    cfg = ImageProcessorConfig()
    assert (cfg.min_pixels, cfg.max_pixels) == (3136, 12845056)
    assert (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size, cfg.factor, cfg.patch_dim) == (14, 2, 2, 28, 1176)
    assert cfg.image_mean == OPENAI_CLIP_MEAN and cfg.image_std == OPENAI_CLIP_STD


@pytest.mark.parametrize(
    "config_json",
    [
        pytest.param(RELEASED_JSON, id="released"),
        pytest.param({**RELEASED_JSON, "min_pixels": 200704, "max_pixels": 1003520}, id="mgpo_bounds"),
        pytest.param(
            {"size": {"shortest_edge": 1000, "longest_edge": 200000}, "image_processor_type": "Qwen2VLImageProcessor"},
            id="size_dict",
        ),
        pytest.param(
            {"size": {"shortest_edge": 1000, "longest_edge": 200000}, "min_pixels": 5000, "max_pixels": 300000},
            id="top_level_keys_win_over_size",
        ),
        pytest.param(
            {**RELEASED_JSON, "patch_size": 16, "merge_size": 1, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
             "do_resize": True, "rescale_factor": 1 / 255, "resample": 3},
            id="other_fields",
        ),  # fmt: skip
    ],
)
def test_from_pretrained_matches_transformers(tmp_path, config_json):
    hf_dir = _write_config(tmp_path, config_json)
    cfg = ImageProcessorConfig.from_pretrained(hf_dir)
    hf = hf_qwen2_vl.Qwen2VLImageProcessorPil.from_pretrained(hf_dir)
    assert (cfg.min_pixels, cfg.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"])
    assert (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size) == (
        hf.patch_size, hf.temporal_patch_size, hf.merge_size
    )  # fmt: skip
    assert cfg.image_mean == tuple(hf.image_mean) and cfg.image_std == tuple(hf.image_std)
    image = random_image(200, 333, seed=15)
    pv, grid = preprocess_image(image, cfg)
    assert_same((pv, grid[None]), hf_preprocess(image, processor=hf))


def test_from_pretrained_fallbacks(tmp_path):
    assert ImageProcessorConfig.from_pretrained(tmp_path) == ImageProcessorConfig()  # no file
    # A file without pixel bounds keeps the released bounds (transformers' class default would be 1003520).
    assert ImageProcessorConfig.from_pretrained(_write_config(tmp_path / "empty", {})) == ImageProcessorConfig()
    # Older transformers wrote the bounds as size.min_pixels / size.max_pixels.
    old = _write_config(tmp_path / "old", {"size": {"min_pixels": 1000, "max_pixels": 200000}})
    assert ImageProcessorConfig.from_pretrained(old) == ImageProcessorConfig(min_pixels=1000, max_pixels=200000)
    assert ImageProcessorConfig.from_pretrained(str(old)).max_pixels == 200000


@pytest.mark.parametrize(
    "override",
    [
        {"do_normalize": False},
        {"do_rescale": False},
        {"resample": 2},
        {"rescale_factor": 0.5},
        {"do_convert_rgb": False},
    ],
)
def test_from_pretrained_rejects_unsupported_options(tmp_path, override):
    hf_dir = _write_config(tmp_path, {**RELEASED_JSON, **override})
    with pytest.raises(ValueError, match=next(iter(override))):
        ImageProcessorConfig.from_pretrained(hf_dir)


def test_config_replace_and_validation():
    cfg = QWEN_DEFAULT.replace(max_pixels=1003520)
    assert cfg.max_pixels == 1003520 and cfg.min_pixels == QWEN_DEFAULT.min_pixels
    assert QWEN_DEFAULT.max_pixels == 12845056  # frozen, unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_pixels = 1
    with pytest.raises(ValueError, match="min_pixels"):
        ImageProcessorConfig(min_pixels=10, max_pixels=5)
    with pytest.raises(ValueError, match="3"):
        ImageProcessorConfig(image_mean=(0.5,))

