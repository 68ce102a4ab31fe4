"""Where a training step's time goes (behind `python -m launch.breakdown`; issue 23).

Each part is compiled on its own for the run's mesh, shardings and batch, and timed like the
benchmark (median of synchronised calls after warm-up):

  step              the whole train step (forward, backward, gradient clipping, AdamW update)
  forward           the loss alone, dropout on as in training
  forward+backward  the loss and its gradients, no update
  optimizer         the AdamW update and parameter write of one step, given gradients
  loss              the LM head and cross-entropy from final hidden states, forward + backward
  no attention      the whole step with every layer's attention replaced by identity (each
                    query head returns its key/value head's value): what attention costs

and, each in a fresh process because XLA reads its flags once (`--flag_sets`), the whole step
under the XLA flag sets JAX users set on Hopper GPUs (FLAG_SETS). A user's own XLA_FLAGS are
kept and come first; a set's flags are appended.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from typing import Any, Callable
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from model import attention
from model.gpt import logits_from_hidden
from sharding import activate, shard_batch
from training.run import Run
from training.step import cross_entropy, loss_fn

# XLA flag sets to compare on a GPU (the flags of JAX's GPU performance guide and MaxText's GPU
# configs); each is appended to the user's XLA_FLAGS in its own process.
FLAG_SETS = {
    "latency_hiding": ("--xla_gpu_enable_latency_hiding_scheduler=true",),
    "cublas_gemms": ("--xla_gpu_enable_triton_gemm=false",),
    "fp_conversion": ("--xla_allow_excess_precision=true",),
    "command_buffers": ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUDNN,CUSTOM_CALL,"
                        "COLLECTIVES,WHILE,CONDITIONAL",),
}
PARTS = ("step", "forward", "forward+backward", "optimizer", "loss", "no attention")


def _time(fn: Callable[[], Any], steps: int, warmup: int) -> float:
  """Median seconds of fn() (its result blocked on), after `warmup` untimed calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


@contextlib.contextmanager
def attention_as_identity():
  """Every causal self-attention without a cache returns its values (key/value head h // R for
  query head h): the projections stay, the score and value matmuls and softmax go."""
  def identity(q_BTHK, k_BSGK, v_BSGK, mask_B1TS, dropout=None):  # pylint: disable=unused-argument
    return jnp.repeat(v_BSGK, q_BTHK.shape[2] // v_BSGK.shape[2], axis=2)
  with mock.patch.object(attention, "implementation", lambda *a, **k: "xla"), \
      mock.patch.object(attention, "reference_attention", identity):
    yield


def measure(run: Run, parts=PARTS, *, steps: int = 10, warmup: int = 3) -> dict[str, float]:
  """Milliseconds of each part for the run's model, batch and mesh (GPT-family runs)."""
  cfg, mesh, rules = run.model, run.mesh, run.rules
  B, width = run.batch_shape
  rng = np.random.default_rng(0)
  batch = shard_batch(rng.integers(0, cfg.vocab_size, (B, width), dtype=np.int32), mesh)
  state = run.create_state()
  key = jax.random.key(0)
  out: dict[str, float] = {}

  def whole_step(state):
    step_fn = run.compile_train_step()
    holder = {"state": state}

    def call():
      holder["state"], metrics = step_fn(holder["state"], batch)
      return metrics
    return _time(call, steps, warmup)

  if "step" in parts:
    out["step"] = whole_step(state) * 1e3
    state = run.create_state()  # the step donated the old one
  with activate(mesh, rules):
    loss = functools.partial(loss_fn, cfg=cfg, tokens_BT1=batch, key=key, train=True)
    if "forward" in parts:
      fwd = jax.jit(lambda p: loss(p))
      out["forward"] = _time(lambda: fwd(state.params), steps, warmup) * 1e3
    if "forward+backward" in parts or "optimizer" in parts:
      grad_fn = jax.jit(jax.value_and_grad(lambda p: loss(p)))
      if "forward+backward" in parts:
        out["forward+backward"] = _time(lambda: grad_fn(state.params), steps, warmup) * 1e3
      grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grad_fn(state.params)[1])
    if "optimizer" in parts:
      def update(params, opt_state, grads):
        updates, opt_state = run.tx.update(grads, opt_state, params)
        return jax.tree_util.tree_map(lambda p, u: (p + u).astype(p.dtype), params,
                                      updates), opt_state
      upd = jax.jit(update)
      out["optimizer"] = _time(lambda: upd(state.params, state.opt_state, grads), steps,
                               warmup) * 1e3
    if "loss" in parts:
      T, D = width - 1, cfg.d_model
      hidden = jax.random.normal(jax.random.key(1), (B, T, D), cfg.compute_dtype)
      targets = batch[:, 1:]

      def head_loss(params, hidden):
        return cross_entropy(logits_from_hidden(params, cfg, hidden), targets)
      head = jax.jit(jax.value_and_grad(head_loss, argnums=(0, 1)))
      out["loss"] = _time(lambda: head(state.params, hidden), steps, warmup) * 1e3
  if "no attention" in parts:
    with attention_as_identity():
      out["no attention"] = whole_step(state) * 1e3
  return out


def format_table(ms: dict[str, float], flag_sets: dict[str, float] | None = None) -> str:
  step = ms.get("step")
  share = lambda v: "" if not step else f"{100 * v / step:>7.0f}%"
  lines = [f"{'part':<28}{'ms':>10}{'of step':>9}"]
  for name, value in ms.items():
    lines.append(f"{name:<28}{value:>10.2f}{share(value)}")
  for name, value in (flag_sets or {}).items():
    lines.append(f"{'step, flags ' + name:<28}{value:>10.2f}{share(value)}")
  return "\n".join(lines)
