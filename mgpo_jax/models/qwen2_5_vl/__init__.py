"""Qwen2.5-VL in Flax NNX with exact parity against transformers.

```python
from mgpo_jax.models import qwen2_5_vl
model = qwen2_5_vl.from_pretrained(hf_dir, dtype=jnp.float32, mesh=None)
logits = model(input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None)  # [B, T, vocab]
```
"""

from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig, UnsupportedConfigError, VisionConfig
from mgpo_jax.models.qwen2_5_vl.model import KVCache, Qwen25VL, check_image_tokens, mrope_cos_sin, rope_index
from mgpo_jax.models.qwen2_5_vl.params import (CheckpointMismatchError, abstract_model, from_pretrained,
                                               hf_shapes, init_model, iter_hf_tensors, load_hf_state)
from mgpo_jax.models.qwen2_5_vl.vision import (VisionInputs, prepare_vision_batch, prepare_vision_images,
                                              prepare_vision_inputs)
