"""PPO-clip policy loss with KL-to-reference and entropy terms (GRPO / MGPO).

Per token t of row b (only where ``mask_BT`` is set, i.e. the tokens the policy sampled; MGPO's
turn mask):

    ratio    = exp(logp - old_logp)
    pg       = max(-A_b * ratio, -A_b * clip(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high))
    kl       = K1: logp - ref_logp      K3: exp(ref_logp - logp) - (ref_logp - logp) - 1
    loss_tok = pg + kl_coef * kl - entropy_coef * entropy

and the per-token losses are aggregated as ``cfg.aggregation`` says (see ``Aggregation``).

Gradient accumulation: the loss of a (micro-)batch is ``numerator / denominator``. Pass
``loss_normalizer = compute_loss_normalizer(mask_BT_of_the_whole_mini_batch, cfg)`` to every
micro-batch; the numerators are additive over rows, so the SUM over micro-batches of the micro
losses (and of their gradients) equals the loss (and gradient) of the whole mini-batch exactly.
Without ``loss_normalizer`` the denominator is computed from the given batch alone.

Metrics are returned as masked SUMS over tokens plus ``num_tokens``, so they combine across
micro-batches (and data-parallel shards) by plain addition; ``summarize_metrics`` turns them into
token means.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp


class KLEstimator(enum.Enum):
  """Per-token estimators of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman, 2020)."""

  K1 = "k1"  # log(pi / pi_ref); unbiased, high variance, can be negative.
  K3 = "k3"  # exp(d) - d - 1 with d = log(pi_ref / pi); unbiased, low variance, >= 0.


class Aggregation(enum.Enum):
  """How per-token losses become one scalar."""

  # Masked mean over all tokens of the mini-batch (paper / verl "token-mean").
  TOKEN_MEAN = "token_mean"
  # Mean over rows of each row's masked token mean (verl "seq-mean-token-mean", original GRPO).
  SEQ_MEAN = "seq_mean"
  # Dr. GRPO: masked token sum / (num_rows * constant_len) (verl "seq-mean-token-sum-norm").
  SEQ_SUM_NORM = "seq_sum_norm"


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """Hyper-parameters of ``policy_loss`` (defaults: the MGPO paper).

  Attributes:
    clip_ratio_low: ratio is clipped below at ``1 - clip_ratio_low``.
    clip_ratio_high: ratio is clipped above at ``1 + clip_ratio_high`` (DAPO "clip-higher" if larger).
    clip_ratio_dual: dual-clip constant c (> 1) for negative advantages, as in verl's
      ``clip_ratio_c``: the loss of a token with A < 0 is capped at ``-A * c``. None disables it.
    kl_coef: weight of the KL-to-reference term (needs ``ref_logp_BT`` when non-zero).
    kl_estimator: ``KLEstimator`` (or its value string).
    entropy_coef: weight of the entropy bonus (needs ``entropy_BT`` when non-zero).
    aggregation: ``Aggregation`` (or its value string).
    seq_sum_norm_len: the constant length of ``SEQ_SUM_NORM`` (e.g. the response-token budget);
      None uses the padded length T of the batch, which is only a constant if T is fixed.
    log_ratio_clip: log-ratios (to the old and to the reference policy) are clipped to
      ``[-log_ratio_clip, log_ratio_clip]`` before ``exp`` so that a stray token cannot overflow to
      inf (verl clips at 20 too); the gradient is zero beyond the clip.
  """

  clip_ratio_low: float = 0.2
  clip_ratio_high: float = 0.2
  clip_ratio_dual: float | None = None
  kl_coef: float = 0.01
  kl_estimator: KLEstimator = KLEstimator.K3
  entropy_coef: float = 0.001
  aggregation: Aggregation = Aggregation.TOKEN_MEAN
  seq_sum_norm_len: int | None = None
  log_ratio_clip: float = 20.0

  def __post_init__(self):
    for field, enum_cls in (("kl_estimator", KLEstimator), ("aggregation", Aggregation)):
      value = getattr(self, field)
      if not isinstance(value, enum_cls):
        try:
          object.__setattr__(self, field, enum_cls(value))
        except ValueError:
          raise ValueError(
              f"{field}={value!r} is not one of {[e.value for e in enum_cls]}."
          ) from None
    if not 0.0 <= self.clip_ratio_low < 1.0:
      raise ValueError(f"clip_ratio_low must be in [0, 1), got {self.clip_ratio_low}.")
    if self.clip_ratio_high < 0.0:
      raise ValueError(f"clip_ratio_high must be >= 0, got {self.clip_ratio_high}.")
    if self.clip_ratio_dual is not None and self.clip_ratio_dual <= 1.0:
      raise ValueError(f"clip_ratio_dual must be > 1 (or None), got {self.clip_ratio_dual}.")
    if self.kl_coef < 0.0 or self.entropy_coef < 0.0:
      raise ValueError(
          f"kl_coef and entropy_coef must be >= 0, got {self.kl_coef}, {self.entropy_coef}."
      )
    if self.seq_sum_norm_len is not None and self.seq_sum_norm_len < 1:
      raise ValueError(f"seq_sum_norm_len must be >= 1 (or None), got {self.seq_sum_norm_len}.")
    if self.log_ratio_clip <= 0.0:
      raise ValueError(f"log_ratio_clip must be > 0, got {self.log_ratio_clip}.")


def compute_loss_normalizer(mask_BT: jax.Array, cfg: PolicyLossConfig) -> jax.Array:
  """Denominator of the aggregated loss for ``mask_BT`` (f32 scalar).

  TOKEN_MEAN: number of masked tokens. SEQ_MEAN: number of rows with at least one masked token.
  SEQ_SUM_NORM: that row count times ``cfg.seq_sum_norm_len`` (or T). Rows without any masked
  token (padding) never count. Call it on the mask of the whole mini-batch and pass the result
  to ``policy_loss`` of every micro-batch for exact gradient accumulation.
  """
  if jnp.ndim(mask_BT) != 2:
    raise ValueError(f"mask_BT must be rank 2 [B, T], got shape {jnp.shape(mask_BT)}.")
  m_BT = jnp.asarray(mask_BT).astype(bool)
  num_rows = jnp.sum(jnp.any(m_BT, axis=-1).astype(jnp.float32))
  if cfg.aggregation is Aggregation.TOKEN_MEAN:
    return jnp.sum(m_BT.astype(jnp.float32))
  if cfg.aggregation is Aggregation.SEQ_MEAN:
    return num_rows
  length = cfg.seq_sum_norm_len if cfg.seq_sum_norm_len is not None else m_BT.shape[1]
  return num_rows * float(length)


def kl_penalty(logp_BT: jax.Array, ref_logp_BT: jax.Array, estimator: KLEstimator,
               log_ratio_clip: float | None = None) -> jax.Array:
  """Per-token KL(pi || pi_ref) estimate from log-probs of tokens sampled from pi."""
  log_ref_ratio = ref_logp_BT - logp_BT
  if log_ratio_clip is not None:
    log_ref_ratio = jnp.clip(log_ref_ratio, -log_ratio_clip, log_ratio_clip)
  if estimator is KLEstimator.K1:
    return -log_ref_ratio
  if estimator is KLEstimator.K3:
    return jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0
  raise ValueError(f"Unknown KL estimator {estimator!r}.")


def _check_args(logp_BT, old_logp_BT, ref_logp_BT, entropy_BT, advantages_B, mask_BT, cfg,
                loss_normalizer) -> None:
  if not isinstance(cfg, PolicyLossConfig):
    raise ValueError(f"cfg must be a PolicyLossConfig, got {type(cfg).__name__}.")
  shape = jnp.shape(logp_BT)
  if len(shape) != 2:
    raise ValueError(f"logp_BT must be rank 2 [B, T], got shape {shape}.")
  named = {"old_logp_BT": old_logp_BT, "ref_logp_BT": ref_logp_BT, "entropy_BT": entropy_BT,
           "mask_BT": mask_BT}
  for name, x in named.items():
    if x is not None and jnp.shape(x) != shape:
      raise ValueError(f"{name} shape {jnp.shape(x)} != logp_BT shape {shape}.")
  if jnp.shape(advantages_B) != shape[:1]:
    raise ValueError(f"advantages_B shape {jnp.shape(advantages_B)} != ({shape[0]},).")
  if loss_normalizer is not None and jnp.ndim(loss_normalizer) != 0:
    raise ValueError(f"loss_normalizer must be a scalar, got shape {jnp.shape(loss_normalizer)}.")
  if ref_logp_BT is None and cfg.kl_coef != 0.0:
    raise ValueError(f"kl_coef={cfg.kl_coef} needs ref_logp_BT (pass it, or set kl_coef=0).")
  if entropy_BT is None and cfg.entropy_coef != 0.0:
    raise ValueError(
        f"entropy_coef={cfg.entropy_coef} needs entropy_BT (pass it, or set entropy_coef=0)."
    )


def policy_loss(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    ref_logp_BT: jax.Array | None,
    entropy_BT: jax.Array | None,
    advantages_B: jax.Array,
    mask_BT: jax.Array,
    cfg: PolicyLossConfig,
    loss_normalizer: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO-clip + KL + entropy loss, masked and aggregated (see the module docstring).

  Args:
    logp_BT: log pi_theta of the sampled tokens (differentiated).
    old_logp_BT: log-probs under the policy that sampled the rollouts (treated as constant).
    ref_logp_BT: log-probs under the reference policy, or None (then ``kl_coef`` must be 0).
    entropy_BT: entropy of pi_theta at each position (differentiated), or None (then
      ``entropy_coef`` must be 0).
    advantages_B: one advantage per row.
    mask_BT: non-zero where the token was sampled by the policy; everything else contributes
      nothing (and gets an exactly-zero gradient), whatever its values, even inf/NaN.
    cfg: ``PolicyLossConfig``.
    loss_normalizer: denominator shared by all micro-batches of a mini-batch, from
      ``compute_loss_normalizer`` on the whole mini-batch's mask; None: from ``mask_BT``.

  Returns:
    ``(loss, metrics)``: f32 scalar loss (0 for a fully masked batch) and a dict of masked token
    sums ``{pg_loss,kl,entropy,clip_frac,ratio,approx_kl}_sum`` plus ``num_tokens`` (``kl_sum`` /
    ``entropy_sum`` only when the corresponding input is given; ``approx_kl`` is the k3 estimate
    of KL(pi_old || pi_theta); ``clip_frac`` counts tokens where the clipped branch is active).
  """
  _check_args(logp_BT, old_logp_BT, ref_logp_BT, entropy_BT, advantages_B, mask_BT, cfg,
              loss_normalizer)
  m_BT = jnp.asarray(mask_BT).astype(bool)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  # Sanitise every input with `where` (not `* mask`) before any arithmetic, so garbage at masked
  # positions can reach neither the forward value nor, as 0 * inf, the gradient.
  logp_BT = jnp.where(m_BT, f32(logp_BT), 0.0)
  old_logp_BT = jnp.where(m_BT, f32(jax.lax.stop_gradient(old_logp_BT)), 0.0)
  adv_BT = jnp.where(m_BT, f32(advantages_B)[:, None], 0.0)
  lim = cfg.log_ratio_clip

  log_ratio_BT = jnp.clip(logp_BT - old_logp_BT, -lim, lim)
  ratio_BT = jnp.exp(log_ratio_BT)
  pg_unclipped_BT = -adv_BT * ratio_BT
  pg_clipped_BT = -adv_BT * jnp.clip(ratio_BT, 1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
  pg_BT = jnp.maximum(pg_unclipped_BT, pg_clipped_BT)
  clipped_BT = (pg_clipped_BT > pg_unclipped_BT) & m_BT
  if cfg.clip_ratio_dual is not None:
    pg_BT = jnp.where(adv_BT < 0, jnp.minimum(pg_BT, -adv_BT * cfg.clip_ratio_dual), pg_BT)
  loss_BT = pg_BT

  metrics = {}
  if ref_logp_BT is not None:
    ref_logp_BT = jnp.where(m_BT, f32(jax.lax.stop_gradient(ref_logp_BT)), 0.0)
    kl_BT = kl_penalty(logp_BT, ref_logp_BT, cfg.kl_estimator, log_ratio_clip=lim)
    loss_BT = loss_BT + cfg.kl_coef * kl_BT
    metrics["kl_sum"] = jnp.sum(jnp.where(m_BT, kl_BT, 0.0))
  if entropy_BT is not None:
    entropy_BT = jnp.where(m_BT, f32(entropy_BT), 0.0)
    loss_BT = loss_BT - cfg.entropy_coef * entropy_BT
    metrics["entropy_sum"] = jnp.sum(entropy_BT)
  loss_BT = jnp.where(m_BT, loss_BT, 0.0)

  if cfg.aggregation is Aggregation.SEQ_MEAN:
    row_tokens_B = jnp.sum(m_BT.astype(jnp.float32), axis=-1)
    numerator = jnp.sum(jnp.sum(loss_BT, axis=-1) / jnp.maximum(row_tokens_B, 1.0))
  else:  # TOKEN_MEAN and SEQ_SUM_NORM differ only in the denominator.
    numerator = jnp.sum(loss_BT)
  if loss_normalizer is None:
    loss_normalizer = compute_loss_normalizer(m_BT, cfg)
  denominator = f32(jax.lax.stop_gradient(loss_normalizer))
  # An all-padding batch has numerator 0: divide by 1 instead of 0 to return 0, not NaN.
  loss = numerator / jnp.where(denominator > 0, denominator, 1.0)

  metrics.update(
      pg_loss_sum=jnp.sum(jnp.where(m_BT, pg_BT, 0.0)),
      clip_frac_sum=jnp.sum(clipped_BT.astype(jnp.float32)),
      ratio_sum=jnp.sum(jnp.where(m_BT, ratio_BT, 0.0)),
      approx_kl_sum=jnp.sum(jnp.where(m_BT, ratio_BT - 1.0 - log_ratio_BT, 0.0)),
      num_tokens=jnp.sum(m_BT.astype(jnp.float32)),
  )
  metrics = jax.tree.map(jax.lax.stop_gradient, metrics)
  return loss, metrics


def summarize_metrics(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Turns (possibly summed-over-micro-batches) ``policy_loss`` metrics into token means."""
  if "num_tokens" not in metrics:
    raise ValueError(f"metrics lack 'num_tokens'; got keys {sorted(metrics)}.")
  n = jnp.maximum(metrics["num_tokens"], 1.0)
  out = {k.removesuffix("_sum"): v / n for k, v in metrics.items() if k.endswith("_sum")}
  out["num_tokens"] = metrics["num_tokens"]
  return out
