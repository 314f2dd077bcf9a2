"""Tiny random transformers Qwen2.5-VL reference models (test only; needs torch)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 290, 291, 288, 289


def tiny_hf_config(tie: bool = False, new_spelling: bool = False, vocab: int = 300, **text_overrides):
  rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
  text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
              bos_token_id=vocab - 12, eos_token_id=vocab - 11, pad_token_id=vocab - 12,
              tie_word_embeddings=tie)
  text.update(text_overrides)
  if new_spelling:
    text["rope_parameters"] = rope
  else:
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    text["rope_theta"] = 10000.0
  vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3, patch_size=14,
                temporal_patch_size=2, spatial_merge_size=2, window_size=112, out_hidden_size=text["hidden_size"],
                fullatt_block_indexes=[1], tokens_per_second=2)
  return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                          video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                          vision_end_token_id=VISION_END, tie_word_embeddings=tie)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
  """Randomise EVERY parameter (HF zero biases / unit norms would hide bugs)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and ("norm" in name or "ln_q" in name):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      else:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5)


def build_reference(path, seed: int = 0, dtype=torch.float32, image_token_id=None, video_token_id=None,
                    vision_start_token_id=None, vision_end_token_id=None, **cfg_kw):
  """Build, randomise and save_pretrained a tiny reference model; returns the torch model.

  The vision token ids default to the constants above; pass a tokenizer's ids to use its chat template.
  """
  torch.manual_seed(seed)
  cfg = tiny_hf_config(**cfg_kw)
  for name, value in (("image_token_id", image_token_id), ("video_token_id", video_token_id),
                      ("vision_start_token_id", vision_start_token_id),
                      ("vision_end_token_id", vision_end_token_id)):
    if value is not None:
      setattr(cfg, name, value)
  model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="eager")
  randomize(model, seed)
  model = model.to(dtype).eval()
  model.save_pretrained(path)
  return model


def hf_logits(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
  """HF logits with the processor's `mm_token_type_ids` (needed for M-RoPE) and, for text-only batches,
  the mask-aware positions that `generate` uses."""
  ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
  mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
  kw = dict(input_ids=ids, attention_mask=mask)
  if pixel_values is not None:
    kw.update(pixel_values=torch.as_tensor(np.asarray(pixel_values)).to(model.dtype),
              image_grid_thw=torch.as_tensor(np.asarray(image_grid_thw), dtype=torch.long),
              mm_token_type_ids=(ids == model.config.image_token_id).int())
  else:
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    kw["position_ids"] = pos[None].expand(3, -1, -1)
  with torch.no_grad():
    return model(**kw).logits.float().numpy()


def image_prompt(grids, merge: int = 2, text_before=(5, 6, 7), text_after=(8, 9), rng=None):
  """Token ids: text, then for each grid <vision_start> pads <vision_end>, then text."""
  ids = list(text_before)
  for t, h, w in grids:
    ids += [VISION_START] + [IMAGE_TOKEN] * (t * h * w // merge**2) + [VISION_END]
    if rng is not None:
      ids += list(rng.integers(10, 280, size=3))
  return ids + list(text_after)


def random_pixels(grids, rng, patch_dim: int = 1176):
  n = sum(t * h * w for t, h, w in grids)
  return rng.standard_normal((n, patch_dim)).astype(np.float32)
