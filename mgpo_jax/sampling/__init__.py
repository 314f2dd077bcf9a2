"""Jitted sampling from Qwen2.5-VL with a continuable KV cache.

```python
from mgpo_jax import sampling
out = sampling.generate(model, input_ids, attention_mask, pixel_values, image_grid_thw,
                        max_new_tokens=64, temperature=0.0, eos_token_ids=[im_end])
out.tokens, out.logprobs    # [B, 64] each; pad after EOS; log_softmax(logits / T) of each token

sampler = sampling.Sampler(model, sampling.SamplerConfig(), tokenizer=tok)   # multi-turn
out1, conv = sampler.start(rows, images, max_new_tokens=..., stop=[parse.TURN1_STOP], ...)
out2, conv = sampler.extend(conv, next_rows, next_images, max_new_tokens=...)
```

`PolicySampler` keeps a `Sampler` on this process's devices fed a learner's weights after every update.
"""

from mgpo_jax.sampling.logits import SamplingParams, choose, filter_logits, top_k_mask, top_p_mask
from mgpo_jax.sampling.policy import PolicySampler
from mgpo_jax.sampling.sampler import (Conversation, SampleOutput, Sampler, SamplerConfig, StopReason, bucket,
                                       generate, pow2_buckets, split_hf_inputs)
from mgpo_jax.sampling.stops import (StopCompiler, StopStrings, StopTable, StopTokens, as_stop_rule,
                                     compile_rule, first_stop, token_bytes)

__all__ = [
    "Conversation", "PolicySampler", "SampleOutput", "Sampler", "SamplerConfig", "SamplingParams", "StopCompiler", "StopReason",
    "StopStrings", "StopTable", "StopTokens", "as_stop_rule", "bucket", "choose", "compile_rule", "filter_logits",
    "first_stop", "generate", "pow2_buckets", "split_hf_inputs", "token_bytes", "top_k_mask", "top_p_mask",
]
