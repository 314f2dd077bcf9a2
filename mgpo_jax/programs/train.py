"""The MGPO training program's loop (`python -m mgpo_jax.main`): prompts -> multi-turn rollouts -> rewards -> GRPO updates -> logs.

One step (every process runs the same code on its own prompts):

  samples  = next(data)                               this process's data.batch_size / P prompts
  rollouts = engine.run(samples)                      process-local, n conversations per prompt
  batch    = to_train_batch(rollouts)                 static shapes: buckets agreed by all processes
  state    = learner.train_on_rollout(state, batch)   one SPMD program per mini-batch, all devices
  sampler.update(state.params)                        reshard the new weights for the next rollouts
  metrics -> metrics.jsonl / TensorBoard / progress bar; every K steps: rollout pictures, eval,
  an Orbax checkpoint (params, optimizer state, data iterator, step), async.

Resuming: the latest checkpoint restores the state and the data iterator; the sampling key of step s
is fold_in(seed, s), and the frozen reference policy is rebuilt from the initial weights, so the steps
after a restart are the steps an uninterrupted run takes. SIGTERM (TPU preemption) saves and exits.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import signal
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mgpo_jax import config as config_lib
from mgpo_jax import sampling
from mgpo_jax.data import pipeline
from mgpo_jax.eval import loop as eval_loop
from mgpo_jax.io import checkpoint as ckpt_io
from mgpo_jax.io import metrics as metrics_lib
from mgpo_jax.io import paths
from mgpo_jax.learner import Learner, TrainState
from mgpo_jax.models.qwen2_5_vl import checkpoint as model_ckpt
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.parallel import processes
from mgpo_jax.programs import experiment
from mgpo_jax.rollout import trajectory as traj_lib
from mgpo_jax.rollout import visualize

logger = logging.getLogger(__name__)

OPT_STATE, META, DATA = "opt_state", "meta", "data"
# Per-step values that depend on the machine's speed, not on the maths (left out of resume checks).
TIMING_PREFIX = "time/"


class _CompileCounter:
  """Counts XLA compilations (jax.monitoring): after warm-up a step should compile nothing."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == self.EVENT:
      self.count += 1


_COMPILES: _CompileCounter | None = None


def compile_count() -> int:
  global _COMPILES
  if _COMPILES is None:
    _COMPILES = _CompileCounter()
  return _COMPILES.count


class Preempted(SystemExit):
  """Raised by `train` once a SIGTERM's checkpoint is saved. A SystemExit with status 0, so `main` exits
  as before and a program that runs several trainings (`mgpo_jax.repro`) stops too, instead of starting
  the next one; the same command resumes them all."""

  def __init__(self, step: int):
    super().__init__(0)
    self.step = step


class _Preemption:
  """Remembers a SIGTERM; the loop saves a checkpoint at the end of the step and exits."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logger.warning("SIGTERM: saving a checkpoint after this step, then exiting")
    self.requested = True

  def any_process(self) -> bool:
    return processes.any_process(self.requested)

  def restore(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)


def _checkpoint_manager(config: Any, root: str) -> ocp.CheckpointManager:
  t = config.train
  options = ocp.CheckpointManagerOptions(
      max_to_keep=t.keep_checkpoints, create=True, enable_async_checkpointing=t.async_checkpoint)
  handlers = {ckpt_io.PARAMS: ckpt_io.params_handler(), OPT_STATE: ocp.PyTreeCheckpointHandler(),
              META: ocp.JsonCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(root, item_handlers=handlers, options=options)


def _save(mngr, step: int, state: TrainState, data_iter) -> None:
  opt_leaves = jax.tree.leaves(state.opt_state)
  mngr.save(step, args=ocp.args.Composite(**{
      ckpt_io.PARAMS: ckpt_io.params_save_args(state.params),
      OPT_STATE: ocp.args.PyTreeSave({f"{i:05d}": x for i, x in enumerate(opt_leaves)}),
      META: ocp.args.JsonSave({"step": step, "optimizer_step": int(jax.device_get(state.step))}),
      DATA: pipeline.save_args(data_iter)}), force=True)


def _restore(mngr, step: int, learner: Learner, data_iter) -> TrainState:
  """The train state of `step`, read straight into the learner's shardings."""
  _, abs_params, _ = nnx.split(params_lib.abstract_model(learner.model_cfg, learner.cfg.precision.param_dtype),
                               nnx.Param, ...)
  abs_opt = jax.eval_shape(learner.tx.init, abs_params)
  opt_leaves, opt_def = jax.tree.flatten(abs_opt)
  opt_shardings = jax.tree.leaves(learner.state_shardings.opt_state)
  targets = {f"{i:05d}": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
             for i, (x, s) in enumerate(zip(opt_leaves, opt_shardings, strict=True))}
  restore_args = {k: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype)
                  for k, t in targets.items()}
  got = mngr.restore(step, args=ocp.args.Composite(**{
      ckpt_io.PARAMS: ckpt_io.params_restore_args(abs_params, learner.mesh),
      OPT_STATE: ocp.args.PyTreeRestore(item=targets, restore_args=restore_args),
      META: ocp.args.JsonRestore(),
      DATA: pipeline.restore_args(data_iter)}))
  nnx.replace_by_pure_dict(abs_params, got[ckpt_io.PARAMS])
  opt_state = jax.tree.unflatten(opt_def, [got[OPT_STATE][k] for k in sorted(got[OPT_STATE])])
  optimizer_step = jax.device_put(np.int32(got[META]["optimizer_step"]), learner.replicated)
  return TrainState(step=optimizer_step, params=abs_params, opt_state=opt_state)


# Keys of the HF config that do not describe the stored weights (the compute dtype is not stored:
# checkpoints hold float32 parameters whatever model.dtype is).
_NOT_STORED = ("torch_dtype", "dtype", "transformers_version", "_name_or_path")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    elif k not in _NOT_STORED:
      out[f"{prefix}{k}"] = v
  return out


def check_resume(root: str, hf_config: dict[str, Any], tokenizer_dir: str | None, process_count: int) -> None:
  """Raises a one-line CheckpointError when the checkpoints under `root` cannot be resumed by this run.

  Runs before anything in the workdir is written, so that a restart with a changed config (model
  shapes, tokenizer, number of processes) stops with the workdir as it was, instead of overwriting
  `hf_config.json` and failing later in the restore.
  """
  steps = [int(n) for n in (os.listdir(root) if os.path.isdir(root) else []) if n.isdigit()]
  if not steps:
    return
  where = f"cannot resume {os.path.dirname(root)} (checkpoints up to step {max(steps)})"
  fix = "rerun with the config it was made with, or use another --workdir"
  stored_path = os.path.join(root, ckpt_io.HF_CONFIG)
  if os.path.isfile(stored_path):
    with open(stored_path, encoding="utf-8") as f:
      stored, new = _flat(json.load(f)), _flat(hf_config)
    diffs = [f"{k}={stored.get(k, '(absent)')!r} in the checkpoints, {new.get(k, '(absent)')!r} in this config"
             for k in sorted(set(stored) | set(new)) if stored.get(k) != new.get(k)]
    if diffs:
      shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
      raise ckpt_io.CheckpointError(f"{where}: the model differs: {shown}; {fix}")
  stored_tok = os.path.join(root, ckpt_io.HF_ASSETS, "tokenizer.json")
  new_tok = os.path.join(tokenizer_dir, "tokenizer.json") if tokenizer_dir else ""
  if os.path.isfile(stored_tok) and os.path.isfile(new_tok) and not filecmp.cmp(stored_tok, new_tok, shallow=False):
    raise ckpt_io.CheckpointError(f"{where}: the tokenizer differs from the one the checkpoints were made "
                                  f"with ({stored_tok} vs {new_tok}); {fix}")
  data_dir = os.path.join(root, str(max(steps)), DATA)
  written = [n for n in (os.listdir(data_dir) if os.path.isdir(data_dir) else []) if n.startswith("process_")]
  if written and not any(n.endswith(f"-of-{process_count}.json") for n in written):
    raise ckpt_io.CheckpointError(f"{where}: its data-iterator state was saved by {written[0]!r}, "
                                  f"this run has {process_count} process(es); {fix}")


def summary(workdir: str, config_arg: str, started: float) -> str:
  """What a finished (or stopped) run says last: its numbers and where everything is."""
  workdir = workdir if paths.is_remote(workdir) else os.path.abspath(workdir)
  rows = metrics_lib.read_metrics(workdir)
  root = os.path.join(workdir, ckpt_io.CHECKPOINTS_SUBDIR)
  steps = sorted(int(n) for n in (os.listdir(root) if os.path.isdir(root) else []) if n.isdigit())
  last = rows[-1] if rows else {}
  evals = [r for r in rows if "eval/accuracy" in r]
  numbers = [f"{k.split('/', 1)[1]} {last[k]:.3g}" for k in ("rollout/reward_mean", "rollout/valid_box_rate")
             if isinstance(last.get(k), (int, float))]
  if evals:
    numbers.append(f"eval accuracy {evals[-1]['eval/accuracy']:.3g} (step {evals[-1]['step']})")
  cfg = f"--config={config_arg} " if config_arg else ""
  lines = [f"done: step {last.get('step', 0)} in {time.perf_counter() - started:.0f} s"
           + (f"; {', '.join(numbers)}" if numbers else ""),
           f"  metrics      {os.path.join(workdir, metrics_lib.METRICS_FILE)}",
           f"  tensorboard  tensorboard --logdir {os.path.join(workdir, metrics_lib.TENSORBOARD_DIR)}"]
  pages = os.path.join(workdir, visualize.ROLLOUTS_DIR, "index.html")
  if paths.is_remote(workdir) or os.path.isfile(pages):
    lines.append(f"  rollouts     {pages}")
  lines += [f"  checkpoints  {root}" + (f" (steps {', '.join(map(str, steps))})" if steps else ""),
            "  resume       the same command (to go further: --config.train.num_steps=N)",
            f"  evaluate     python -m mgpo_jax.evaluate {cfg}--checkpoint={workdir}",
            f"  export       python tools/convert_weights.py --direction=jax_to_hf --src={workdir} "
            f"--dst={workdir.rstrip('/')}_hf  (or train.export_hf_at_end=True)"]
  return "\n".join(lines)


def rollout_batch(config: Any, engine, samples, rng, *, group_offset: int, model_cfg, pad_id: int):
  """Rollouts of this process's `samples` -> (host TrainBatch, trajectories, rollout metrics).

  Samples are decoded `rollout.sampling_batch_size` at a time; a trajectory's `sample_index` is its
  sample's index in `samples`, its group id that plus `group_offset` (unique over processes).
  """
  trajectories, metrics, host_s, total_s = [], [], 0.0, 0.0
  size = config.rollout.sampling_batch_size or len(samples)
  for start in range(0, len(samples), size):
    result = engine.run(samples[start:start + size], rng)
    for tr in result.trajectories:
      tr.sample_index += start
    trajectories += result.trajectories
    metrics.append(result.metrics)
    host_s += sum(result.timings.host_s[1:])  # between turns: decode, parse, crop, preprocess, render
    total_s += result.timings.total_s
  num_turns = engine.cfg.num_turns
  # Shared-prefix layout (rl.batch): each prompt once (tokens bucketed like turn-1 prompts), per row the rest
  # of its conversation (two buckets per octave up to the largest whole-conversation / patch bucket).
  sizes = traj_lib.layout_sizes(trajectories, model_cfg.vision, model_cfg.image_token_id)
  pre_len, pre_patches, cont_len, cont_patches = processes.global_max(
      sizes.prefix_tokens, sizes.prefix_patches, sizes.tokens, sizes.patches)
  r = config.rollout
  batch = traj_lib.to_train_batch(
      trajectories, [group_offset + t.sample_index for t in trajectories],
      seq_bucket=sampling.bucket(cont_len, traj_lib.fine_buckets(r.seq_buckets[-1]),
                                 "continuation length (rollout.seq_buckets)"),
      patch_bucket=sampling.bucket(cont_patches, traj_lib.fine_buckets(r.patch_buckets[-1]),
                                   "continuation patches per row (rollout.patch_buckets)"),
      prefix_bucket=sampling.bucket(pre_len, r.prompt_buckets, "prompt length (rollout.prompt_buckets)"),
      prefix_patch_bucket=sampling.bucket(pre_patches, r.patch_buckets, "prompt patches (rollout.patch_buckets)"),
      max_images=max(num_turns - 1, 1), prefix_max_images=1, pad_id=pad_id, vision_cfg=model_cfg.vision,
      max_turns=num_turns, image_token_id=model_cfg.image_token_id)
  means = {f"rollout/{k}": float(np.mean([m[k] for m in metrics if k in m])) for k in metrics[0]}
  means[TIMING_PREFIX + "rollout_s"] = total_s
  means[TIMING_PREFIX + "host_between_turns_frac"] = host_s / max(total_s, 1e-9)
  return batch, trajectories, means


def train(config: Any, workdir: str) -> dict[str, float]:
  """Runs (or resumes) the experiment `config` (a ConfigDict) in `workdir`; returns the last step's metrics."""
  config_lib.validate(config)
  config_lib.validate_runtime(config, num_devices=jax.device_count(), process_count=jax.process_count())
  config = config_lib.parse(config)  # from here on the typed, frozen sections
  if not paths.is_remote(workdir):  # gs://... is used as given (Orbax, epath)
    workdir = os.path.abspath(workdir)
  paths.makedirs(workdir)
  t = config.train

  mesh = experiment.make_mesh(config)
  tokenizer = experiment.load_tokenizer(config, workdir)
  model_cfg = experiment.build_model_config(config, tokenizer)
  root = os.path.join(workdir, ckpt_io.CHECKPOINTS_SUBDIR)
  hf_config = experiment.hf_config(config, model_cfg)
  if not paths.is_remote(root):
    check_resume(root, hf_config, experiment.tokenizer_dir(config, workdir), jax.process_count())
  learner = Learner(config_lib.learner_config(config), model_cfg, mesh)
  model_ckpt.write_root(root, hf_config, assets_from=experiment.tokenizer_dir(config, workdir))
  experiment.write_release_assets(config, model_cfg, tokenizer, os.path.join(root, ckpt_io.HF_ASSETS))
  mngr = _checkpoint_manager(config, root)

  local_batch = config.data.batch_size // jax.process_count()
  data_iter = iter(pipeline.make_dataset(
      experiment.train_source(config, workdir), batch_size=local_batch, seed=config.data.shuffle_seed,
      num_epochs=config.data.num_epochs, drop_remainder=True, max_image_pixels=config.data.max_image_pixels,
      worker_count=config.data.worker_count, read_threads=config.data.read_threads,
      prefetch=config.data.prefetch))

  # The reference policy is always the initial model (rebuilt on resume, deterministically).
  initial = experiment.build_model(config, model_cfg, mesh)
  start = mngr.latest_step() or 0
  if start:
    logger.info("resuming from step %d in %s", start, root)
    state = _restore(mngr, start, learner, data_iter)
    ref = learner.reference_params(nnx.state(initial, nnx.Param))
    del initial
  else:
    state = learner.init(initial)  # takes over (donates) the model's arrays
    ref = learner.reference_params(state.params)
  policy = experiment.make_policy_sampler(config, model_cfg, state.params, learner.param_shardings, tokenizer)
  engine = experiment.make_engine(config, policy.sampler, tokenizer)
  eval_engine = experiment.make_engine(config, policy.sampler, tokenizer, greedy=True)
  eval_set = categories = None
  pad_id = tokenizer.pad_token_id

  writer = metrics_lib.MetricsWriter(workdir, start_step=start, total_steps=t.num_steps)
  preempt = _Preemption()
  last: dict[str, float] = {}
  step, preempted = start, False
  compiles = compile_count()

  def run_eval() -> dict[str, float]:
    nonlocal eval_set, categories
    if eval_set is None:
      eval_set, categories = experiment.eval_samples(config), experiment.eval_categories(config)
    return eval_loop.evaluate(eval_engine, eval_set, batch_size=config.eval.batch_size, categories=categories)

  if step < t.num_steps:  # minutes on a TPU for a 7B model; nothing would show on screen meanwhile
    logger.info("step %d: compiling the rollout and update programs (XLA); the first step takes longer",
                step + 1)
  try:
    if t.eval_at_start and writer.last_step is None:  # the initial policy's numbers, as step 0
      writer.write_scalars(0, run_eval())
    while step < t.num_steps:
      try:
        samples = next(data_iter)
      except StopIteration:
        logger.info("data exhausted after %d steps (data.num_epochs=%s)", step, config.data.num_epochs)
        break
      t0 = time.perf_counter()
      rng = jax.random.fold_in(jax.random.key(t.seed), step)
      batch, trajectories, roll = rollout_batch(
          config, engine, samples, rng, group_offset=jax.process_index() * local_batch,
          model_cfg=model_cfg, pad_id=pad_id)
      t1 = time.perf_counter()
      state, learner_metrics = learner.train_on_rollout(state, ref, batch)
      policy.update(state.params)
      learner_metrics = jax.device_get(learner_metrics)
      t2 = time.perf_counter()
      step += 1
      last = {k: float(np.mean([m[k] for m in learner_metrics])) for k in learner_metrics[0]}
      last = {f"train/{k}": v for k, v in last.items()}
      last.update(processes.global_mean(roll))
      last[TIMING_PREFIX + "update_s"] = t2 - t1
      last[TIMING_PREFIX + "step_s"] = t2 - t0

      if t.visualize_every and step % t.visualize_every == 0 and jax.process_index() == 0:
        shown = [tr for tr in trajectories if tr.generation_index == 0][:t.num_visualize]
        visualize.log_rollouts(writer, step, [
            visualize.record_from_trajectory(tr, samples[tr.sample_index], model_cfg.vision.patch_size)
            for tr in shown])
      if (t.eval_every and step % t.eval_every == 0) or (t.eval_at_end and step == t.num_steps):
        last.update(run_eval())
      # Compilations during the step (rollout, update, eval): nonzero after warm-up = a shape leaked.
      compiles, last["compile/xla_compilations"] = compile_count(), compile_count() - compiles
      writer.write_scalars(step, last)

      preempted = preempt.any_process()
      if preempted or step == t.num_steps or (t.checkpoint_every and step % t.checkpoint_every == 0):
        _save(mngr, step, state, data_iter)
      if preempted:
        logger.warning("preempted: checkpoint of step %d saved; exiting", step)
        break
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    preempt.restore()

  if preempted:
    raise Preempted(step)
  if t.export_hf_at_end and step == t.num_steps and jax.process_index() == 0:
    # safetensors are written to a local folder; a remote run exports next to the user's home.
    dst = (os.path.join(os.path.expanduser("~/mgpo_hf_export"), os.path.basename(workdir.rstrip("/")))
           if paths.is_remote(workdir) else os.path.join(workdir, "hf_export"))
    logger.info("exporting step %d as a Hugging Face checkpoint to %s", step, dst)
    model_ckpt.export_hf(root, dst, step=step, overwrite=True)
  return last
