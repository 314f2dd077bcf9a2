"""Qwen2.5-VL model configuration, read from (and written back to) a Hugging Face `config.json`.

Sizes always come from the config, never from weight shapes. Two spellings exist in the wild:
the released checkpoints keep the text fields at the top level with `rope_scaling` (`"type": "mrope"`),
newer transformers nest them under `text_config` with `rope_parameters`. Both are accepted.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping


class UnsupportedConfigError(ValueError):
  """The config asks for something this port does not implement."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  out_hidden_size: int = 3584
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  tokens_per_second: int = 2
  rope_theta: float = 10000.0
  hidden_act: str = "silu"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Values per flattened patch row: C * T * p * p (1176 for the released models)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  """Text decoder + vision tower sizes and the special token ids (read from config.json)."""

  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_layers: int = 28
  num_heads: int = 28
  num_kv_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  mrope_section: tuple[int, ...] = (16, 24, 24)
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 128000
  hidden_act: str = "silu"
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: int | tuple[int, ...] | None = 151645
  pad_token_id: int | None = None
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)

  def __post_init__(self):
    validate(self)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def replace(self, **kw) -> "Qwen25VLConfig":
    return dataclasses.replace(self, **kw)

  # --- released sizes (vision tower identical for all of them) -------------------------------
  @classmethod
  def qwen2_5_vl_3b(cls) -> "Qwen25VLConfig":
    return cls(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
               num_heads=16, num_kv_heads=2, tie_word_embeddings=True,
               vision=VisionConfig(out_hidden_size=2048))

  @classmethod
  def qwen2_5_vl_7b(cls) -> "Qwen25VLConfig":
    return cls()

  @classmethod
  def qwen2_5_vl_32b(cls) -> "Qwen25VLConfig":
    return cls(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64,
               num_heads=40, num_kv_heads=8, vision=VisionConfig(out_hidden_size=5120))

  @classmethod
  def qwen2_5_vl_72b(cls) -> "Qwen25VLConfig":
    return cls(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80,
               num_heads=64, num_kv_heads=8, vision=VisionConfig(out_hidden_size=8192))

  # --- HF config.json ----------------------------------------------------------------------
  @classmethod
  def from_pretrained(cls, hf_dir: str | os.PathLike) -> "Qwen25VLConfig":
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no config.json in {hf_dir!r}")
    with open(path) as f:
      return cls.from_hf_dict(json.load(f))

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> "Qwen25VLConfig":
    model_type = d.get("model_type", "qwen2_5_vl")
    if model_type not in ("qwen2_5_vl", "qwen2_5_vl_text"):
      raise UnsupportedConfigError(f"model_type {model_type!r} is not Qwen2.5-VL")
    text = dict(d.get("text_config") or {})
    # Released checkpoints keep text fields at the top level; nested ones win when both exist.
    t = {**{k: v for k, v in d.items() if k not in ("text_config", "vision_config")}, **text}
    rope = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
      raise UnsupportedConfigError(f"rope type {rope_type!r} is not supported (only default/mrope)")
    if t.get("use_sliding_window"):
      raise UnsupportedConfigError("use_sliding_window=True is not supported (released models use False)")
    v = dict(d.get("vision_config") or {})
    if "in_chans" in v and "in_channels" not in v:
      v["in_channels"] = v["in_chans"]
    vision_rope = dict(v.get("rope_parameters") or {})
    vdefaults = VisionConfig()
    vision = VisionConfig(
        depth=v.get("depth", vdefaults.depth),
        hidden_size=v.get("hidden_size", vdefaults.hidden_size),
        intermediate_size=v.get("intermediate_size", vdefaults.intermediate_size),
        num_heads=v.get("num_heads", vdefaults.num_heads),
        in_channels=v.get("in_channels", vdefaults.in_channels),
        patch_size=v.get("patch_size", vdefaults.patch_size),
        temporal_patch_size=v.get("temporal_patch_size", vdefaults.temporal_patch_size),
        spatial_merge_size=v.get("spatial_merge_size", vdefaults.spatial_merge_size),
        window_size=v.get("window_size", vdefaults.window_size),
        out_hidden_size=v.get("out_hidden_size", t.get("hidden_size", vdefaults.out_hidden_size)),
        fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", vdefaults.fullatt_block_indexes)),
        tokens_per_second=v.get("tokens_per_second", vdefaults.tokens_per_second),
        rope_theta=vision_rope.get("rope_theta", vdefaults.rope_theta),
        hidden_act=v.get("hidden_act", vdefaults.hidden_act),
    )
    eos = t.get("eos_token_id", d.get("eos_token_id"))
    defaults = cls.__dataclass_fields__
    def get(key, field=None):
      field = field or key
      return t.get(key, defaults[field].default)
    return cls(
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"),
        num_layers=t.get("num_hidden_layers", defaults["num_layers"].default),
        num_heads=t.get("num_attention_heads", defaults["num_heads"].default),
        num_kv_heads=t.get("num_key_value_heads") or t.get("num_attention_heads", defaults["num_kv_heads"].default),
        rms_norm_eps=get("rms_norm_eps"),
        rope_theta=rope.get("rope_theta", t.get("rope_theta", defaults["rope_theta"].default)),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        max_position_embeddings=get("max_position_embeddings"),
        hidden_act=get("hidden_act"),
        image_token_id=d.get("image_token_id", t.get("image_token_id", defaults["image_token_id"].default)),
        video_token_id=d.get("video_token_id", t.get("video_token_id", defaults["video_token_id"].default)),
        vision_start_token_id=d.get("vision_start_token_id", defaults["vision_start_token_id"].default),
        vision_end_token_id=d.get("vision_end_token_id", defaults["vision_end_token_id"].default),
        bos_token_id=t.get("bos_token_id", d.get("bos_token_id")),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=t.get("pad_token_id", d.get("pad_token_id")),
        vision=vision,
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """A config.json in the released (flat) layout; transformers reads it directly."""
    v = self.vision
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "hidden_act": self.hidden_act,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(self.mrope_section)},
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": self.num_layers,
        "attention_dropout": 0.0,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": self.pad_token_id,
        "image_token_id": self.image_token_id,
        "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id,
        "vision_end_token_id": self.vision_end_token_id,
        "vision_config": {
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_chans": v.in_channels,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size,
            "out_hidden_size": v.out_hidden_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": v.tokens_per_second,
            "hidden_act": v.hidden_act,
        },
    }


def validate(cfg: Qwen25VLConfig) -> None:
  """Fail early, with the offending field named, on configs the port cannot run."""
  if cfg.hidden_size % cfg.num_heads:
    raise UnsupportedConfigError(f"hidden_size {cfg.hidden_size} not divisible by num_heads {cfg.num_heads}")
  if cfg.num_heads % cfg.num_kv_heads:
    raise UnsupportedConfigError(f"num_heads {cfg.num_heads} not divisible by num_kv_heads {cfg.num_kv_heads}")
  if 2 * sum(cfg.mrope_section) != cfg.head_dim:
    raise UnsupportedConfigError(
        f"mrope_section {cfg.mrope_section} must sum to head_dim/2 = {cfg.head_dim // 2}")
  if len(cfg.mrope_section) != 3:
    raise UnsupportedConfigError(f"mrope_section must have 3 entries, got {cfg.mrope_section}")
  if cfg.hidden_act != "silu" or cfg.vision.hidden_act != "silu":
    raise UnsupportedConfigError(f"only silu MLPs are supported, got {cfg.hidden_act}/{cfg.vision.hidden_act}")
  v = cfg.vision
  if v.hidden_size % v.num_heads or (v.hidden_size // v.num_heads) % 4:
    raise UnsupportedConfigError("vision head_dim must be divisible by 4 (2-D rotary)")
  if v.window_size % (v.patch_size * v.spatial_merge_size):
    raise UnsupportedConfigError(
        f"window_size {v.window_size} must be a multiple of patch_size*spatial_merge_size")
  if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
    raise UnsupportedConfigError(f"fullatt_block_indexes {v.fullatt_block_indexes} outside depth {v.depth}")
