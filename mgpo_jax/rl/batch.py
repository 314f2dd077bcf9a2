"""The batch the learner consumes: what the rollout produces, in static (bucketed) shapes.

One row = one sampled multi-turn conversation, compacted (no holes) and right-padded to a length bucket:

  tokens:     [system+user1+<img pads>+asst hdr][turn-1 sample ... <|im_end|>][user2 + <crop pads> + asst hdr][turn-2 sample ... <|im_end|>][pad ...]
  mask:        1 ...............................................................................................................................  0 ...
  loss_mask:   0 ...............................  1 ................................  0 ..............................  1 ................................  0 ...

`loss_mask_BT[t]` (the MGPO turn mask) and `old_logp_BT[t]` refer to token t itself (predicted by the
logits at t - 1). Images are in the batched layout: row b's images (original, crop, ...) in
`vision` [B, P, ...] and `image_grid_BI3` [B, I, 3], so everything shards along rows.
"""

from __future__ import annotations

import flax.struct
import jax

from mgpo_jax.models.qwen2_5_vl.vision import VisionInputs


@flax.struct.dataclass
class TrainBatch:
  input_ids_BT: jax.Array      # int32
  mask_BT: jax.Array           # int32, 1 on real tokens
  loss_mask_BT: jax.Array      # float32, 1 on tokens the model sampled (incl. each turn's <|im_end|>)
  old_logp_BT: jax.Array       # float32, sampling log-prob of token t (0 off the loss mask)
  rewards_B: jax.Array         # float32
  group_ids_B: jax.Array       # int32 prompt index within the batch; -1 = padding row
  vision: VisionInputs | None  # batched layout [B, P, ...]; None for text-only batches
  image_grid_BI3: jax.Array    # int32 [B, I, 3]; zero rows = no image
  valid_box_B: jax.Array       # float32, metrics only: turn-1 box parsed and valid
  turn_lengths_BK: jax.Array   # int32, metrics only: sampled tokens per turn (K = max_turns)
