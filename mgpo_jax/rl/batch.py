"""The batch the learner consumes: what the rollout produces, in static (bucketed) shapes.

Shared-prefix layout. The `num_generations` rows of a group start with the same prompt (system + original
image + question), so a batch holds each distinct prompt once, as a PREFIX, and per row only its
CONTINUATION:

  prefix g:      [system+user1+<img pads>+asst hdr minus its last token][pad ...]        prefix_*_GS  [G, S]
  row b:         [last prompt token][turn-1 sample <|im_end|>][user2 + <crop pads> + asst hdr][turn 2 ...][pad]
  mask:           1 .......................................................................................  0 ...
  loss_mask:      0                  1 ...                     0 ...                           1 ...        0 ...

Row b's full conversation is `prefix_ids_GS[prefix_index_B[b]]` (its real tokens) followed by its
continuation; the learner attends each continuation token to its prefix's keys/values plus its own causal
keys, with M-RoPE positions that continue the prefix's (`Qwen25VL.forward_shared`), so every number equals
the per-row computation over the whole conversation.

Why the prefix is the prompt MINUS ITS LAST TOKEN: the logits at the last prompt token predict the first
sampled token. Keeping that token in the continuation puts every logit the loss needs in the continuation;
the prefix's hidden states only feed keys/values (no prefix logits are computed). The continuation's first
token is thus always a prompt token, off the loss mask (and, like position 0 of a whole sequence, it has no
log-prob here).

`loss_mask_BT[t]` (the MGPO turn mask) and `old_logp_BT[t]` refer to continuation token t itself (predicted
by the logits at t - 1). Images are in the batched layout: a prefix's images (the original) in
`prefix_vision` [G, Pp, ...] / `prefix_grid_GI3`, row b's later images (crops) in `vision` [B, P, ...] /
`image_grid_BI3`, so everything shards along rows and prefixes.

`prefix_index_B` indexes the batch's prefix table. On the host (`to_train_batch`) the table holds each
distinct prompt of the rollout once; `Learner.split_rollout` regroups it per micro-batch and per device
(each device's rows only point at prefixes on the same device). An unshared batch (`share_prefix=False`) is
the same layout with one prefix per row.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax

from mgpo_jax.models.qwen2_5_vl.vision import VisionInputs


@flax.struct.dataclass
class TrainBatch:
  # ---- prefixes (G = prefixes in the table)
  prefix_ids_GS: jax.Array          # int32 [G, S]: shared prompt minus its last token, right padded
  prefix_mask_GS: jax.Array         # int32 [G, S], 1 on real tokens
  prefix_vision: VisionInputs | None  # batched layout [G, Pp, ...]; None when no prefix has an image
  prefix_grid_GI3: jax.Array        # int32 [G, Ip, 3]; zero rows = no image
  # ---- rows (B = rows)
  prefix_index_B: jax.Array         # int32: the row's prefix in the table
  input_ids_BT: jax.Array           # int32 continuation tokens
  mask_BT: jax.Array                # int32, 1 on real tokens
  loss_mask_BT: jax.Array           # float32, 1 on tokens the model sampled (incl. each turn's <|im_end|>)
  old_logp_BT: jax.Array            # float32, sampling log-prob of token t (0 off the loss mask)
  rewards_B: jax.Array              # float32
  group_ids_B: jax.Array            # int32 prompt index within the batch; -1 = padding row
  vision: VisionInputs | None       # continuation images, batched layout [B, P, ...]; None if there are none
  image_grid_BI3: jax.Array         # int32 [B, I, 3]; zero rows = no image
  valid_box_B: jax.Array            # float32, metrics only: turn-1 box parsed and valid
  turn_lengths_BK: jax.Array        # int32, metrics only: sampled tokens per turn (K = max_turns)


PREFIX_FIELDS = ("prefix_ids_GS", "prefix_mask_GS", "prefix_vision", "prefix_grid_GI3")


ROW_FIELDS = tuple(f.name for f in dataclasses.fields(TrainBatch) if f.name not in PREFIX_FIELDS)
