"""AdamW with nanoGPT's schedule and weight-decay mask, built with optax.

    tx = make_optimizer(config.optimizer, total_steps=config.train.steps)

- learning rate (schedule="cosine"): linear warmup lr * (s + 1) / (warmup + 1) for s < warmup,
  then cosine decay from lr to min_lr over [warmup, decay_steps], then min_lr (nanoGPT's
  get_lr, s = 0-based step); schedule="rsqrt": the 2017 Transformer's
  lr * min((s + 1) / warmup, sqrt(warmup / (s + 1))), i.e. d^-0.5 min(n^-0.5, n warmup^-1.5)
  with n = s + 1 when lr = (d warmup)^-0.5 (its peak, at n = warmup);
- weight decay only on weight matrices ("kernel" leaves; "embedding" leaves too when
  decay_embeddings), never on biases or norm scales;
- gradients clipped to a global norm of `clip` first (0 disables clipping).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def lr_schedule(lr: float, min_lr: float, warmup_steps: int, decay_steps: int
                ) -> Callable[[Any], jax.Array]:
  """step -> learning rate (float32), usable inside jit and on the host."""
  lr, min_lr = float(lr), float(min_lr)
  warmup, decay = int(warmup_steps), int(decay_steps)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    warm = lr * (s + 1.0) / (warmup + 1.0)
    ratio = jnp.clip((s - warmup) / max(decay - warmup, 1), 0.0, 1.0)
    cosine = min_lr + 0.5 * (1.0 + jnp.cos(math.pi * ratio)) * (lr - min_lr)
    return jnp.where(s < warmup, warm, jnp.where(s > decay, min_lr, cosine))

  return schedule


def decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
  """True for the leaves weight decay applies to: matmul kernels (and embeddings if asked).
  Works on plain and nn.Partitioned-boxed parameter trees (a bool replaces each box)."""
  names = {"kernel", "embedding"} if decay_embeddings else {"kernel"}

  def leaf_name(path) -> str:
    key = path[-1]
    return str(getattr(key, "key", getattr(key, "name", key)))

  return jax.tree_util.tree_map_with_path(
      lambda path, _: leaf_name(path) in names, params,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def rsqrt_schedule(lr: float, warmup_steps: int) -> Callable[[Any], jax.Array]:
  """Vaswani et al. (2017): linear warmup to lr at step warmup, then lr sqrt(warmup / n)."""
  lr, warmup = float(lr), max(int(warmup_steps), 1)

  def schedule(step):
    n = jnp.asarray(step, jnp.float32) + 1.0
    return lr * jnp.minimum(n / warmup, jnp.sqrt(warmup / n))

  return schedule


SCHEDULES = ("cosine", "rsqrt")


def schedule_from_config(opt, total_steps: int) -> Callable[[Any], jax.Array]:
  kind = opt.get("schedule", "cosine")
  if kind not in SCHEDULES:
    from model.errors import UserError  # pylint: disable=import-outside-toplevel
    raise UserError(f"config.optimizer.schedule must be one of {', '.join(SCHEDULES)}; got "
                    f"{kind!r}.")
  if kind == "rsqrt":
    return rsqrt_schedule(opt.lr, opt.warmup_steps)
  decay_steps = total_steps if opt.get("decay_steps") is None else opt.decay_steps
  return lr_schedule(opt.lr, opt.min_lr, opt.warmup_steps, decay_steps)


def make_optimizer(opt, total_steps: int) -> optax.GradientTransformation:
  """The optax transformation for a config section with fields lr, min_lr, warmup_steps,
  decay_steps (None: total_steps), weight_decay, decay_embeddings, b1, b2, eps, clip."""
  schedule = schedule_from_config(opt, total_steps)
  adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                      weight_decay=opt.weight_decay,
                      mask=lambda p: decay_mask(p, bool(opt.decay_embeddings)))
  # The same chain with or without clipping, so a checkpoint's optimizer state has one layout.
  clip = optax.clip_by_global_norm(opt.clip) if opt.clip > 0 else optax.identity()
  return optax.chain(clip, adamw)
