"""Pure train and eval steps, jitted once with explicit shardings.

    train_step = compile_train_step(cfg, tx, schedule, mesh, abstract_state, batch_shape,
                                    grad_accum, rules)   # or Run.compile_train_step()
    state, metrics = train_step(state, batch_BT1)   # state donated; metrics: loss, grad_norm, lr

A GPT batch is int32 tokens [B, T + 1] (inputs are [:, :-1], targets [:, 1:]), or in the
`packed` layout three planes tokens | segment_ids | loss_mask (training/lm_inputs.py: examples
packed into rows, the loss on the scored targets only); data.document_mask keeps the documents
of a tokens batch apart (`eot_id`). With loss_chunk = C
(0 < C < T, C dividing T) the loss never holds the [B, T, V] float32 logits: it is computed from
the final hidden states over chunks of C positions, each chunk's logits recomputed in the
backward pass (see chunked_cross_entropy). With grad_accum = A
the batch is split into A micro-batches of B / A rows (row r goes to micro-batch r mod A, so each
micro-batch stays split over all data-parallel devices) that a lax.scan runs one after another,
summing float32 gradients; loss and gradients are means over all B * T tokens (packed: over all
the batch's scored targets, sum(nll * w) / sum(w), each micro-batch's sum divided by the whole
batch's count), the same as one step on the whole batch.
"""

from __future__ import annotations

from typing import Any, Callable

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.config import ModelConfig
from model.errors import UserError
from model.families import build
from model.gpt import GPT, logits_from_hidden
from model.moe import MOE_COLLECTION, moe_metrics, moe_objective
from sharding import DEFAULT_RULES, activate, batch_sharding, is_cpu
from training.adapters import join, split_trainable
from training.dpo import METRICS as DPO_METRICS
from training.dpo import DPOSettings, dpo_loss_and_metrics, pair_count
from training.lm_inputs import batch_weight, check_layout, lm_inputs, packed_metrics
from training.state import TrainState

ACT_BATCH = ("act_batch", None)


def uses_dropout(cfg: ModelConfig) -> bool:
  return max(cfg.embd_dropout, cfg.attn_dropout, cfg.resid_dropout) > 0


def token_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Float32 cross-entropy of every position [B, T]: logsumexp(logits) - logits[target].

  The target logit is picked with a one-hot mask rather than a gather, so the gradient is an
  elementwise select, not a scatter-add (slow on XLA:CPU); XLA fuses the mask into the sum."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  is_target_BTV = jnp.arange(logits_BTV.shape[-1]) == targets_BT[..., None]
  target_BT = jnp.sum(jnp.where(is_target_BTV, logits_BTV, 0.0), axis=-1)
  return jax.nn.logsumexp(logits_BTV, axis=-1) - target_BT


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Mean float32 cross-entropy over all positions."""
  return jnp.mean(token_cross_entropy(logits_BTV, targets_BT))


def check_loss_chunk(loss_chunk: Any) -> None:
  if isinstance(loss_chunk, bool) or not isinstance(loss_chunk, int) or loss_chunk < 0:
    raise UserError(f"config.train.loss_chunk must be a whole number of positions >= 0 "
                    f"(0: the full logits), got {loss_chunk!r}.")


def chunked_cross_entropy(params: Any, cfg: ModelConfig, x_BTD: jax.Array,
                          targets_BT: jax.Array, chunk: int) -> jax.Array:
  """cross_entropy(logits_from_hidden(params, cfg, x_BTD), targets_BT) without the [B, T, V]
  logits: a lax.scan over the T / chunk chunks of `chunk` positions, each under jax.checkpoint,
  so the forward pass keeps only the running loss and the backward pass recomputes one chunk's
  logits at a time. Costs one more LM-head matmul per token (the recomputation) and saves the
  float32 logits and their gradient. (A Python loop over the chunks instead lets XLA schedule
  them side by side: more temporaries than the full logits on a v5e, docs/performance.md.)
  XLA's cost analysis counts the scan's body once (see training/perf/aot.py)."""
  B, T, _ = x_BTD.shape
  return chunked_nll_sum(params, cfg, x_BTD, targets_BT, chunk) / (B * T)


def chunked_nll_sum(params: Any, cfg: ModelConfig, x_BTD: jax.Array, targets_BT: jax.Array,
                    chunk: int, weights_BT: jax.Array | None = None) -> jax.Array:
  """The sum of the (weights_BT-weighted) cross-entropies of chunked_cross_entropy."""
  B, T, D = x_BTD.shape
  if T % chunk:
    raise UserError(f"config.train.loss_chunk ({chunk}) must divide the sequence length {T} "
                    f"(or be 0: the full logits).")
  head = {name: params[name] for name in ("wte", "lm_head") if name in params}

  @functools.partial(jax.checkpoint, prevent_cse=False)  # in a scan: no CSE across iterations
  def chunk_loss(total, xs):
    x_BCD, targets_BC, weights_BC = xs
    x_BCD = nn.with_logical_constraint(x_BCD, ("act_batch", "act_length", "act_embed"))
    loss_BC = token_cross_entropy(logits_from_hidden(head, cfg, x_BCD), targets_BC)
    if weights_BC is not None:
      loss_BC = loss_BC * weights_BC
    return total + jnp.sum(loss_BC), None

  n = T // chunk
  per_chunk = lambda a: None if a is None else jnp.moveaxis(
      a.reshape(B, n, chunk, *a.shape[2:]), 1, 0)
  total, _ = jax.lax.scan(chunk_loss, jnp.zeros((), jnp.float32),
                          (per_chunk(x_BTD), per_chunk(targets_BT), per_chunk(weights_BT)))
  return total


def loss_fn(params: Any, cfg: ModelConfig, tokens_BT1: jax.Array, key: jax.Array | None,
            train: bool, loss_chunk: int = 0, label_smoothing: float = 0.0,
            layout: str = "tokens", eot_id: int | None = None) -> jax.Array:
  """The training loss of a batch (loss_and_metrics without the metrics)."""
  return loss_and_metrics(params, cfg, tokens_BT1, key, train, loss_chunk, label_smoothing,
                          layout=layout, eot_id=eot_id)[0]


def weighted_cross_entropy(logits_BTV, targets_BT, weights_BT, cfg: ModelConfig,
                           label_smoothing: float = 0.0):
  """(mean loss over the weighted positions, {"accuracy": argmax == target there}). With label
  smoothing e the loss is (1 - e) CE + e x the mean of -log p over the vocabulary (the
  model's vocab_size entries; padded ones have no probability)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  safe_BT = jnp.maximum(targets_BT, 0)
  nll_BT = token_cross_entropy(logits_BTV, safe_BT)
  if label_smoothing:
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)[..., :cfg.vocab_size]
    nll_BT = (1 - label_smoothing) * nll_BT - label_smoothing * jnp.mean(logp_BTV, axis=-1)
  w_BT = weights_BT.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(w_BT), 1.0)
  correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
  return jnp.sum(nll_BT * w_BT) / count, {"accuracy": jnp.sum(correct_BT * w_BT) / count}


def split_seq2seq(cfg: ModelConfig, batch_BW: jax.Array):
  """A seq2seq batch [B, S + T + 1] -> (source [B, S], decoder inputs [B, T], targets [B, T])."""
  S = cfg.block_size
  return batch_BW[:, :S], batch_BW[:, S:-1], batch_BW[:, S + 1:]


def dropout_key(key: jax.Array, cfg: ModelConfig) -> jax.Array:
  """The key the model's dropout masks are drawn with: `key` itself (threefry), or with
  cfg.dropout_rng="rbg" an rbg key made from its bits (the same key gives the same masks)."""
  if cfg.dropout_rng == "rbg":
    return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
  return key


def loss_and_metrics(params: Any, cfg: ModelConfig, batch: jax.Array, key: jax.Array | None,
                     train: bool, loss_chunk: int = 0, label_smoothing: float = 0.0, *,
                     layout: str = "tokens", eot_id: int | None = None,
                     weight_total: jax.Array | None = None, dpo: DPOSettings | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metrics) of one batch (dropout on when train), by cfg.family:
    gpt     mean next-token cross-entropy of [B, T + 1] tokens; with 0 < loss_chunk < T over
            chunks of the sequence (chunked_cross_entropy); no metrics. Documents kept apart
            with `eot_id` (data.document_mask). In the packed `layout` (training/lm_inputs.py)
            sum(nll * w) over the scored targets / weight_total (default: their count), with
            the metrics scored_tokens and padding_tokens. A mixture of experts (model/moe.py)
            adds the weighted load-balancing and z losses to the loss, and to the metrics the
            cross-entropy as "loss" (what the steps report), moe_aux_loss, moe_z_loss,
            moe_dropped and, in training, moe_load [E]
    bert    masked LM: inputs [B, :T], targets [B, T:] (-1: not chosen); loss and accuracy on
            the chosen positions only
    encdec  teacher forcing on [B, S + T + 1] (split_seq2seq): loss and token accuracy on the
            target tokens (padding masked); the source padding masked in attention
  label_smoothing applies to bert and encdec (training/data/tasks.py has the batch formats).
  The "preference" layout is DPO's loss (training/dpo.py, with the `dpo` settings), its pairs'
  means over weight_total pairs."""
  dropout = train and uses_dropout(cfg)
  rngs = {"dropout": dropout_key(key, cfg)} if dropout else None
  if cfg.family == "bert":
    T = cfg.block_size
    inputs_BT, targets_BT = batch[:, :T], batch[:, T:]
    logits_BTV = build(cfg).apply({"params": params}, inputs_BT, deterministic=not dropout,
                                  rngs=rngs)
    return weighted_cross_entropy(logits_BTV, targets_BT, targets_BT >= 0, cfg,
                                  label_smoothing)
  if cfg.family == "encdec":
    src_BS, tgt_in_BT, tgt_out_BT = split_seq2seq(cfg, batch)
    logits_BTV = build(cfg).apply({"params": params}, src_BS, tgt_in_BT, src_BS != cfg.pad_id,
                                  deterministic=not dropout, rngs=rngs)
    return weighted_cross_entropy(logits_BTV, tgt_out_BT, tgt_out_BT != cfg.pad_id, cfg,
                                  label_smoothing)
  if layout == "preference":
    return dpo_loss_and_metrics(params, cfg, batch, dpo or DPOSettings(),
                                deterministic=not dropout, rngs=rngs, pair_total=weight_total)
  lm = lm_inputs(cfg, batch, layout, eot_id)
  chunked = 0 < loss_chunk < lm.inputs_BT.shape[1]
  out = GPT(cfg).apply({"params": params}, lm.inputs_BT, deterministic=not dropout,
                       rngs=rngs, return_hidden=chunked, segment_ids_BT=lm.segment_ids_BT,
                       prefix_BT=lm.prefix_BT,
                       mutable=[MOE_COLLECTION] if cfg.num_experts else False)
  if cfg.num_experts:
    out, sown = out
  if lm.weights_BT is None:
    if chunked:
      loss = chunked_cross_entropy(params, cfg, out, lm.targets_BT, loss_chunk)
    else:
      loss = cross_entropy(out, lm.targets_BT)
    metrics = {}
  else:
    if chunked:
      nll = chunked_nll_sum(params, cfg, out, lm.targets_BT, loss_chunk, lm.weights_BT)
    else:
      nll = jnp.sum(token_cross_entropy(out, lm.targets_BT) * lm.weights_BT)
    if weight_total is None:
      weight_total = jnp.maximum(jnp.sum(lm.weights_BT), 1.0)
    loss, metrics = nll / weight_total, packed_metrics(lm)
  if not cfg.num_experts:
    return loss, metrics
  experts = moe_metrics(sown[MOE_COLLECTION], cfg)
  if not train:
    del experts["moe_load"]
  return loss + moe_objective(experts, cfg), {**metrics, "loss": loss, **experts}


def split_micro_batches(tokens_BT1: jax.Array, grad_accum: int) -> jax.Array:
  """[B, T+1] -> [A, B/A, T+1] (A = grad_accum); micro-batch j holds rows j, j + A, j + 2A, ..."""
  B = tokens_BT1.shape[0]
  return jnp.swapaxes(tokens_BT1.reshape(B // grad_accum, grad_accum, -1), 0, 1)


# Metrics that are counts: summed over micro-batches (the others are means of equal parts).
# DPO's metrics are sums over a micro-batch's pairs / the batch's pairs: summed too.
COUNT_METRICS = ("scored_tokens", "padding_tokens", *DPO_METRICS)


def _finish_metrics(aux: dict[str, jax.Array], batch: jax.Array) -> dict[str, jax.Array]:
  """padding_tokens (a packed batch's) as padding_share: the share of its B x T inputs."""
  if "padding_tokens" not in aux:
    return aux
  aux = dict(aux)
  inputs = batch.shape[0] * (batch.shape[1] // 3 - 1)
  aux["padding_share"] = aux.pop("padding_tokens") / inputs
  return aux


def _merge_micro(aux_A: dict[str, jax.Array], shares: bool) -> dict[str, jax.Array]:
  """The micro-batches' metrics [A, ...] as the batch's: counts summed, the others averaged
  (moe_load [A, E] per expert), "loss" summed when each micro-batch's is its share of the
  batch's (`shares`: a packed or preference batch)."""
  summed = COUNT_METRICS + (("loss",) if shares else ())
  return {k: jnp.sum(v, axis=0) if k in summed else jnp.mean(v, axis=0)
          for k, v in aux_A.items()}


def train_step(state: TrainState, tokens_BT1: jax.Array, *, cfg: ModelConfig,
               tx: optax.GradientTransformation, schedule: Callable, grad_accum: int = 1,
               param_shardings: Any = None, loss_chunk: int = 0, label_smoothing: float = 0.0,
               layout: str = "tokens", eot_id: int | None = None,
               dpo: DPOSettings | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update from a global batch. Pure: (state, batch) -> (state, metrics).
  `param_shardings` (optional) keeps the accumulated gradients laid out like the parameters
  (split over fsdp / tensor) instead of leaving it to XLA; `loss_chunk`: see loss_fn; `layout`
  and `eot_id`: see loss_and_metrics (a packed batch's loss is normalised by the whole batch's
  scored targets in every micro-batch, so the sum of theirs is exactly the batch's)."""
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  # Only the trainable parameters are differentiated (a LoRA model's adapters; the base gets
  # no gradient and no optimizer state: training/adapters.py).
  trainable, frozen = split_trainable(cfg, state.params)
  loss_of = functools.partial(loss_and_metrics, loss_chunk=loss_chunk,
                              label_smoothing=label_smoothing, layout=layout, eot_id=eot_id,
                              dpo=dpo)
  grad_fn = jax.value_and_grad(lambda t, *args, **kw: loss_of(join(t, frozen), *args, **kw),
                               has_aux=True)
  to_f32 = lambda tree: jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), tree)
  if param_shardings is not None:
    param_shardings = split_trainable(cfg, param_shardings)[0]

  if grad_accum == 1:
    tokens_BT1 = nn.with_logical_constraint(tokens_BT1, ACT_BATCH)
    (loss, aux), grads = grad_fn(trainable, cfg, tokens_BT1, step_key, True)
    grads = to_f32(grads)
  else:
    micro_ABT1 = split_micro_batches(tokens_BT1, grad_accum)
    total = _weight_total(tokens_BT1, layout)  # None: means of equal micro-batches

    def micro_step(grads_sum, xs):
      i, tokens = xs
      tokens = nn.with_logical_constraint(tokens, ACT_BATCH)
      (loss, aux), grads = grad_fn(trainable, cfg, tokens, jax.random.fold_in(step_key, i),
                                   True, weight_total=total)
      grads_sum = jax.tree_util.tree_map(jnp.add, grads_sum, to_f32(grads))
      if param_shardings is not None:
        grads_sum = jax.lax.with_sharding_constraint(grads_sum, param_shardings)
      return grads_sum, (loss, aux)

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    if param_shardings is not None:
      zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
    grads, (losses_A, aux_A) = jax.lax.scan(micro_step, zeros,
                                            (jnp.arange(grad_accum), micro_ABT1))
    if total is None:
      grads = jax.tree_util.tree_map(lambda g: g / grad_accum, grads)
      loss = jnp.mean(losses_A)
    else:  # each micro-batch's loss and gradients are its share of the batch's already
      loss = jnp.sum(losses_A)
    aux = _merge_micro(aux_A, total is not None)

  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  params = join(optax.apply_updates(trainable, updates), frozen)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
             **_finish_metrics(aux, tokens_BT1)}
  return new_state, metrics


def _weight_total(batch: jax.Array, layout: str) -> jax.Array | None:
  """What a batch's loss is normalised by under gradient accumulation: its scored targets
  (packed), its pairs (preference), or None (equal micro-batches)."""
  return pair_count(batch) if layout == "preference" else batch_weight(batch, layout)


def eval_step(params: Any, tokens_BT1: jax.Array, *, cfg: ModelConfig, grad_accum: int = 1,
              loss_chunk: int = 0, layout: str = "tokens", eot_id: int | None = None,
              dpo: DPOSettings | None = None) -> dict[str, jax.Array]:
  """{"loss": mean loss, and the family's metrics (accuracy; a packed batch's scored_tokens and
  padding_share)} of a global batch, run in the same micro-batches (and loss chunks) as
  training; no label smoothing (the plain loss)."""
  total = _weight_total(tokens_BT1, layout) if grad_accum > 1 else None

  def metrics(tokens):
    loss, aux = loss_and_metrics(params, cfg, nn.with_logical_constraint(tokens, ACT_BATCH),
                                 None, False, loss_chunk, layout=layout, eot_id=eot_id,
                                 weight_total=total, dpo=dpo)
    return {"loss": loss, **aux}

  if grad_accum == 1:
    return _finish_metrics(metrics(tokens_BT1), tokens_BT1)
  _, out_A = jax.lax.scan(lambda _, tokens: (None, metrics(tokens)), None,
                          split_micro_batches(tokens_BT1, grad_accum))
  return _finish_metrics(_merge_micro(out_A, total is not None), tokens_BT1)


def scored_nll(params: Any, tokens_BT1: jax.Array, weights_BT: jax.Array, *,
               cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """(sum of weights_BT x next-token cross-entropy, sum of weights_BT) of a [B, T + 1] batch,
  no dropout: the loss of chosen positions (launch.eval scores each token once)."""
  tokens_BT1 = nn.with_logical_constraint(tokens_BT1, ACT_BATCH)
  logits_BTV = GPT(cfg).apply({"params": params}, tokens_BT1[:, :-1])
  nll_BT = token_cross_entropy(logits_BTV, tokens_BT1[:, 1:])
  weights_BT = weights_BT.astype(jnp.float32)
  return jnp.sum(nll_BT * weights_BT), jnp.sum(weights_BT)


def compile_score_step(cfg: ModelConfig, mesh: Mesh, abstract_params: Any,
                       batch_shape: tuple[int, int], rules=DEFAULT_RULES):
  """scored_nll compiled ahead of time: (params, tokens [B, T + 1], weights [B, T]) ->
  (nll sum, weight sum), both replicated scalars."""
  B, T1 = batch_shape
  replicated = NamedSharding(mesh, PartitionSpec())
  fn = jax.jit(functools.partial(scored_nll, cfg=cfg),
               in_shardings=(_shardings(abstract_params), batch_sharding(mesh),
                             batch_sharding(mesh)),
               out_shardings=(replicated, replicated))
  weights = jax.ShapeDtypeStruct((B, T1 - 1), jnp.float32, sharding=batch_sharding(mesh))
  with activate(mesh, rules):
    return _compile(fn.lower(abstract_params, _batch_struct(mesh, batch_shape), weights), mesh)


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of jax.Arrays or ShapeDtypeStructs."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _shardings(abstract_tree: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: x.sharding, abstract_tree)


def _batch_struct(mesh: Mesh, batch_shape: tuple[int, int]) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(batch_shape), jnp.int32, sharding=batch_sharding(mesh))


# The XLA options the project sets, all of them (launch.benchmark prints them beside the user's
# XLA_FLAGS, which the project never changes): XLA:CPU hands only the matmuls to YNNPACK
# instead of also fusing elementwise ops into its graphs; the quick start's training step is
# ~10-15% faster with it (docs/performance.md). None on GPU or TPU (issue 23's GPU flag sets
# are still to be measured there).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def _compile(lowered, mesh: Mesh):
  """lowered.compile(), with CPU_COMPILER_OPTIONS on a CPU mesh (skipped by an XLA that does
  not know them)."""
  if is_cpu(mesh):
    try:
      return lowered.compile(CPU_COMPILER_OPTIONS)
    except jax.errors.JaxRuntimeError as e:
      if "xla_cpu_experimental_ynn_fusion_type" not in str(e):
        raise
  return lowered.compile()


def compile_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, schedule: Callable,
                       mesh: Mesh, abstract_state: TrainState, batch_shape: tuple[int, int],
                       grad_accum: int = 1, rules=DEFAULT_RULES, loss_chunk: int = 0,
                       label_smoothing: float = 0.0, layout: str = "tokens",
                       eot_id: int | None = None, dpo: DPOSettings | None = None):
  """train_step compiled ahead of time for one state layout and batch shape [B, T + 1]
  (packed `layout`: [B, 3 (T + 1)]): (state, batch) -> (state, metrics). The state is donated.
  `abstract_state` holds ShapeDtypeStructs with shardings (see abstract_like). Calling the
  result with other shapes or shardings is an error, never a silent recompilation."""
  check_loss_chunk(loss_chunk)
  check_layout(layout, batch_shape[1], eot_id)
  state_shardings = _shardings(abstract_state)
  fn = jax.jit(lambda s, b: train_step(s, b, cfg=cfg, tx=tx, schedule=schedule,
                                       grad_accum=grad_accum,
                                       param_shardings=state_shardings.params,
                                       loss_chunk=loss_chunk,
                                       label_smoothing=label_smoothing, layout=layout,
                                       eot_id=eot_id, dpo=dpo),
               in_shardings=(state_shardings, batch_sharding(mesh)),
               out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
               donate_argnums=0)
  with activate(mesh, rules):
    return _compile(fn.lower(abstract_state, _batch_struct(mesh, batch_shape)), mesh)


def compile_eval_step(cfg: ModelConfig, mesh: Mesh, abstract_params: Any,
                      batch_shape: tuple[int, int], grad_accum: int = 1, rules=DEFAULT_RULES,
                      loss_chunk: int = 0, layout: str = "tokens", eot_id: int | None = None,
                      dpo: DPOSettings | None = None):
  """eval_step compiled ahead of time: (params, batch) -> its metrics (replicated scalars)."""
  check_loss_chunk(loss_chunk)
  check_layout(layout, batch_shape[1], eot_id)
  fn = jax.jit(lambda p, b: eval_step(p, b, cfg=cfg, grad_accum=grad_accum,
                                      loss_chunk=loss_chunk, layout=layout, eot_id=eot_id,
                                      dpo=dpo),
               in_shardings=(_shardings(abstract_params), batch_sharding(mesh)),
               out_shardings=NamedSharding(mesh, PartitionSpec()))
  with activate(mesh, rules):
    return _compile(fn.lower(abstract_params, _batch_struct(mesh, batch_shape)), mesh)
