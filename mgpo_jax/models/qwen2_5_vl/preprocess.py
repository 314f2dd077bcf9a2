"""Qwen2.5-VL image preprocessing in numpy, bit-identical to transformers' PIL path.

Reference: `transformers.models.qwen2_vl.Qwen2VLImageProcessorPil` (transformers 5.24). Per image it does

  1. convert to RGB, compositing any transparency onto white;
  2. `smart_resize` the (height, width) to multiples of `patch_size * merge_size` (28) with the pixel count
     inside [min_pixels, max_pixels], then PIL bicubic resize;
  3. rescale by 1/255 (in float64, then cast to float32) and normalise with the CLIP mean/std (in float32);
  4. cut into 14x14 patches, duplicate the single frame to `temporal_patch_size` (2) frames, and flatten
     each patch to C*T*ph*pw = 1176 values ordered (C, T, py, px), patches in 2x2 merge-block order:

       patch grid (gh x gw), merge_size 2        rows of pixel_values
       +----+----+----+----+                      0: (0,0)  1: (0,1)  2: (1,0)  3: (1,1)
       | 0  | 1  | 4  | 5  |                      4: (0,2)  5: (0,3)  6: (1,2)  7: (1,3)
       +----+----+----+----+                      8: (2,0)  ...
       | 2  | 3  | 6  | 7  |
       +----+----+----+----+

Step 3 is a pure function of (channel, uint8 value), so it is a [C, 256] lookup table built with exactly
the reference's float ops; the patch reordering is done on the uint8 image (a quarter of the bytes), and
one broadcasting copy writes the final float32 rows with the frame repeated. Everything runs on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PREPROCESSOR_CONFIG = "preprocessor_config.json"
# Options of the HF processor that this module hard-codes: a preprocessor_config.json asking for anything
# else is rejected rather than silently processed differently.
_FIXED_HF_OPTIONS = {
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": int(Image.Resampling.BICUBIC),
}


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """Image preprocessing settings; defaults are Qwen2.5-VL's released preprocessor_config.json."""

    min_pixels: int = 56 * 56  # 3136
    max_pixels: int = 28 * 28 * 16384  # 12845056
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self):
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 (RGB) values, got {self.image_mean}, {self.image_std}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")

    @property
    def factor(self) -> int:
        """Side lengths of resized images are multiples of this (28)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values per row of `pixel_values`: C * T * ph * pw (1176)."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_pretrained(cls, hf_dir: str | os.PathLike) -> ImageProcessorConfig:
        """Reads `hf_dir/preprocessor_config.json` if present, else returns the defaults.

        Pixel bounds come from the top-level `min_pixels`/`max_pixels` keys if present (as in the released
        checkpoints; they take precedence, as in transformers), else from `size.shortest_edge` /
        `size.longest_edge` (what recent transformers writes), else from `size.min_pixels` /
        `size.max_pixels` (older transformers). Missing keys keep this class's defaults.

        Raises:
            ValueError: if the file asks for a processing option this module does not implement
                (e.g. `do_normalize: false` or another resample filter).
        """
        path = os.path.join(os.fspath(hf_dir), _PREPROCESSOR_CONFIG)
        if not os.path.exists(path):
            return cls()
        with open(path) as f:
            d = json.load(f)
        for key, expected in _FIXED_HF_OPTIONS.items():
            if key in d and d[key] != expected:
                raise ValueError(f"{path}: {key}={d[key]!r} is not supported (only {expected!r})")
        size = d.get("size") or {}
        kw = {}
        for field, value in (
            ("min_pixels", _first_set(d.get("min_pixels"), size.get("shortest_edge"), size.get("min_pixels"))),
            ("max_pixels", _first_set(d.get("max_pixels"), size.get("longest_edge"), size.get("max_pixels"))),
            *((field, d.get(field)) for field in ("patch_size", "temporal_patch_size", "merge_size")),
        ):
            if value is not None:
                kw[field] = int(value)
        for field in ("image_mean", "image_std"):
            if d.get(field) is not None:
                kw[field] = tuple(float(v) for v in d[field])
        return cls(**kw)

    def replace(self, **kw) -> ImageProcessorConfig:
        return dataclasses.replace(self, **kw)

    def to_hf_dict(self) -> dict:
        """`preprocessor_config.json` of transformers' Qwen2VLImageProcessor for these settings (the
        inverse of `from_pretrained`)."""
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
            **_FIXED_HF_OPTIONS,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
        }

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Writes `out_dir/preprocessor_config.json`."""
        with open(os.path.join(os.fspath(out_dir), _PREPROCESSOR_CONFIG), "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2)


def _first_set(*values):
    return next((v for v in values if v is not None), None)


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = ImageProcessorConfig.min_pixels,
    max_pixels: int = ImageProcessorConfig.max_pixels,
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, about [min_pixels, max_pixels] pixels, same aspect.

    Same arithmetic as transformers' `smart_resize` (Python's round-half-even included). Like it, this
    does not reject sides shorter than `factor` (they are enlarged), and the result can leave the pixel
    range when clamping a side to `factor` or rounding up forces it to.

    Raises:
        ValueError: if a side is not positive (transformers divides by zero) or the aspect ratio is
            above 200 (same check and message as transformers).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image height and width must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@functools.lru_cache(maxsize=8)
def _normalize_lut(image_mean: tuple[float, ...], image_std: tuple[float, ...]) -> np.ndarray:
    """[C, 256] float32: the reference's rescale + normalise of every uint8 value, per channel.

    Same ops and dtypes as transformers: float64(v) * (1/255) cast to float32, then (x - mean) / std with
    mean and std as float32 arrays; so a lookup is bit-identical to computing it on the image.
    """
    x_V = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean_C1 = np.asarray(image_mean, dtype=np.float32)[:, None]
    std_C1 = np.asarray(image_std, dtype=np.float32)[:, None]
    lut_CV = (x_V[None, :] - mean_C1) / std_C1
    lut_CV.flags.writeable = False
    return lut_CV


def _to_rgb(image: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb`: transparency is composited onto white, then RGB."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def preprocess_image(image: Image.Image, cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (pixel_values float32 [gh*gw, 1176], grid_thw int64 [3] = (1, gh, gw)).

    Raises:
        TypeError: if `image` is not a PIL image.
        ValueError: from `smart_resize` for degenerate sizes.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    height, width = smart_resize(
        image.height, image.width, factor=cfg.factor, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels
    )
    rgb = _to_rgb(image).resize((width, height), resample=Image.Resampling.BICUBIC)
    img_HWC = np.asarray(rgb)
    gh, gw = height // p, width // p
    n, c = gh * gw, img_HWC.shape[-1]

    # (H, W, C) -> (C, gh/m, gw/m, m, m, ph, pw): merge blocks, then patches inside a block, then pixels.
    # Channel-first so that each channel's table lookup reads and writes contiguous memory.
    blocks = img_HWC.reshape(gh // m, m, p, gw // m, m, p, c).transpose(6, 0, 3, 1, 4, 2, 5)
    patches_CNP = np.ascontiguousarray(blocks).reshape(c, n, p * p)  # uint8, the cheap copy
    lut_CV = _normalize_lut(tuple(cfg.image_mean), tuple(cfg.image_std))
    values_CNP = np.empty((c, n, p * p), np.float32)
    for ci in range(c):
        np.take(lut_CV[ci], patches_CNP[ci], out=values_CNP[ci])
    # One copy writes the final rows: (N, C, T, ph*pw), the frame repeated along T.
    values_NC1P = values_CNP.transpose(1, 0, 2)[:, :, None]
    pixel_values = np.broadcast_to(values_NC1P, (n, c, t, p * p)).reshape(n, c * t * p * p)
    return pixel_values, np.array([1, gh, gw], dtype=np.int64)


def preprocess_images(images: Sequence[Image.Image], cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> (pixel_values float32 [sum N_i, 1176], grid_thw int64 [num_images, 3]).

    An empty sequence gives arrays with zero rows (transformers raises instead).
    """
    if not images:
        return np.zeros((0, cfg.patch_dim), np.float32), np.zeros((0, 3), np.int64)
    pixel_values, grid_thw = zip(*(preprocess_image(image, cfg) for image in images))
    # One image: no concatenate, which would copy up to ~300 MiB for a max_pixels image.
    pixel_values = pixel_values[0] if len(pixel_values) == 1 else np.concatenate(pixel_values, axis=0)
    return pixel_values, np.stack(grid_thw)


def num_image_tokens(grid_thw: np.ndarray | Sequence[int], merge_size: int = 2) -> int | np.ndarray:
    """LLM tokens per image: t*h*w // merge_size**2.

    Returns an int for one grid of shape [3], an int64 array [N] for grids of shape [N, 3].
    """
    grid_thw = np.asarray(grid_thw, dtype=np.int64)
    if grid_thw.shape[-1:] != (3,) or grid_thw.ndim > 2:
        raise ValueError(f"grid_thw must have shape [3] or [N, 3], got {grid_thw.shape}")
    tokens = np.prod(grid_thw, axis=-1) // merge_size**2
    return int(tokens) if grid_thw.ndim == 1 else tokens
