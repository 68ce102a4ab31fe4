"""DPO (Rafailov et al. 2023): the loss of a preference batch, beside the step that uses it
(training/step.py: the "preference" layout).

A preference batch is int32 [B, 3 (T + 1)] = tokens | segment_ids | loss_mask, as a packed
batch (training/lm_inputs.py), with pairs kept together: segment 2k - 1 of a row is pair k's
prompt + chosen completion, segment 2k its prompt + rejected completion, the loss mask on the
completions' tokens (training/data/preference.py). A sequence's log-probability is the sum of
its completion tokens' log-probabilities (TRL's); the reference is the starting point: with
LoRA the same model with its adapters switched off (the base's weights, no second copy),
without LoRA a frozen copy of the starting weights kept beside the parameters
(training/adapters.py: REFERENCE; not trained, not checkpointed, re-read from init_from). With the policy's and the
reference's log-ratios c = log pi(chosen) - log ref(chosen), r = the same for rejected and
d = c - r, the per-pair losses are (TRL's DPOTrainer, loss_type):

  sigmoid  -log sigmoid(beta d)
  robust   (-(1 - e) log sigmoid(beta d) + e log sigmoid(-beta d)) / (1 - 2e)   (e: label
           smoothing; Chowdhury et al. 2024, unbiased under flipped labels)
  cdpo     -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d)   (conservative DPO)
  ipo      (c / |chosen| - r / |rejected| - 1 / (2 beta))^2   (Azar et al. 2023, TRL's per-token
           normalisation by the completions' lengths)

averaged over the pairs of the whole batch (also under gradient accumulation), and the metrics
TRL logs: rewards/chosen = mean beta c, rewards/rejected = mean beta r, rewards/margins,
rewards/accuracies = the share of pairs with beta c > beta r, logps/chosen, logps/rejected;
and two accuracies with ties counted half (ACCURACIES), meaningful from step 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from model import lora
from model.config import ModelConfig
from model.errors import UserError
from model.gpt import GPT
from training.adapters import REFERENCE
from training.lm_inputs import lm_inputs, packed_planes

LOSSES = ("sigmoid", "robust", "cdpo", "ipo")
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected")
# Accuracies that mean something at step 0 too, ties counted half: TRL's rewards/accuracies is
# 0 there (every reward is 0 and it counts beta c > beta r), ours 0.5. accuracy/reward: the
# share of pairs the implicit reward model (the margin) ranks right; accuracy/logp: the share
# the policy itself prefers (log pi(chosen) > log pi(rejected)), at step 0 the starting model's.
ACCURACIES = ("accuracy/reward", "accuracy/logp")
METRICS = TRL_METRICS + ACCURACIES + ("pairs",)  # pairs: how many the batch holds


@dataclasses.dataclass(frozen=True)
class DPOSettings:
  beta: float = 0.1
  loss: str = "sigmoid"
  label_smoothing: float = 0.0


def settings_from_config(config) -> DPOSettings:
  """config.train.dpo, checked."""
  section = config.train.get("dpo") or {}
  beta = section.get("beta", 0.1)
  loss, smoothing = section.get("loss", "sigmoid"), section.get("label_smoothing", 0.0)
  if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
    raise UserError(f"config.train.dpo.beta must be a positive number, got {beta!r}.")
  if loss not in LOSSES:
    raise UserError(f"config.train.dpo.loss must be one of {', '.join(LOSSES)}; got {loss!r}.")
  if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not (
      0 <= smoothing < 0.5):
    raise UserError(f"config.train.dpo.label_smoothing must be in [0, 0.5), got "
                    f"{smoothing!r}.")
  return DPOSettings(float(beta), loss, float(smoothing))


def sequence_logps(params, cfg: ModelConfig, batch, *, deterministic: bool = True, rngs=None):
  """(log-probability [B, M] of each segment's scored tokens, their count [B, M]) of a packed
  batch, M = T + 1 segment slots (slot 0: padding)."""
  lm = lm_inputs(cfg, batch, "packed")
  logits_BTV = GPT(cfg).apply({"params": params}, lm.inputs_BT, deterministic=deterministic,
                              rngs=rngs, segment_ids_BT=lm.segment_ids_BT)
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  is_target_BTV = jnp.arange(logp_BTV.shape[-1]) == lm.targets_BT[..., None]
  logp_BT = jnp.sum(jnp.where(is_target_BTV, logp_BTV, 0.0), axis=-1) * lm.weights_BT
  B, T = logp_BT.shape
  M = T + 1
  seg_BT = packed_planes(batch)[1][:, 1:]  # the target's segment
  flat = (jnp.arange(B)[:, None] * M + seg_BT).reshape(-1)
  sums = jax.ops.segment_sum(logp_BT.reshape(-1), flat, num_segments=B * M).reshape(B, M)
  counts = jax.ops.segment_sum(lm.weights_BT.reshape(-1), flat,
                               num_segments=B * M).reshape(B, M)
  return sums, counts


def split_reference(params):
  """(the policy's parameters, a DPO run's frozen reference copy or None)."""
  if REFERENCE in params:
    return {k: v for k, v in params.items() if k != REFERENCE}, params[REFERENCE]
  return params, None


def reference_logps(params, cfg: ModelConfig, batch):
  """The reference's segment log-probabilities [B, M] (no dropout, no gradient): the frozen
  copy's of a full fine-tune, else the base's (the adapters switched off: the parameters
  without them, the config without LoRA)."""
  reference = split_reference(params)[1]
  if reference is not None:
    return jax.lax.stop_gradient(sequence_logps(jax.lax.stop_gradient(reference), cfg, batch)[0])
  if not cfg.lora_rank:
    raise UserError("DPO needs a reference: a LoRA model's base, or a frozen copy of the "
                    "starting weights (training/adapters.py: with_reference).")
  base = jax.lax.stop_gradient(lora.split_adapters(params)[1])
  return jax.lax.stop_gradient(sequence_logps(base, lora.without_lora(cfg), batch)[0])


def pairs(values_BM):
  """(chosen [B, P], rejected [B, P]) slots of a [B, M] segment array."""
  P = (values_BM.shape[1] - 1) // 2
  return values_BM[:, 1:2 * P:2], values_BM[:, 2:2 * P + 1:2]


def pair_count(batch) -> jax.Array:
  """The pairs of a preference batch (float32, at least 1): its chosen segments."""
  seg = packed_planes(batch)[1]
  present = jax.vmap(lambda s: jnp.zeros(s.shape[0] + 1, bool).at[s].set(True))(seg)
  chosen, _ = pairs(present)
  return jnp.maximum(jnp.sum(chosen.astype(jnp.float32)), 1.0)


def pair_losses(chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_tokens,
                rejected_tokens, settings: DPOSettings):
  """(per-pair loss, beta c, beta r) from the sequences' log-probabilities."""
  beta, e = settings.beta, settings.label_smoothing
  c, r = chosen_logps - ref_chosen, rejected_logps - ref_rejected
  d = c - r
  if settings.loss == "sigmoid":
    loss = -jax.nn.log_sigmoid(beta * d)
  elif settings.loss == "robust":
    loss = (-(1 - e) * jax.nn.log_sigmoid(beta * d)
            + e * jax.nn.log_sigmoid(-beta * d)) / (1 - 2 * e)
  elif settings.loss == "cdpo":
    loss = -(1 - e) * jax.nn.log_sigmoid(beta * d) - e * jax.nn.log_sigmoid(-beta * d)
  else:  # ipo
    delta = c / jnp.maximum(chosen_tokens, 1.0) - r / jnp.maximum(rejected_tokens, 1.0)
    loss = (delta - 1 / (2 * beta)) ** 2
  return loss, beta * c, beta * r


def dpo_loss_and_metrics(params, cfg: ModelConfig, batch, settings: DPOSettings, *,
                         deterministic: bool = True, rngs=None, pair_total=None):
  """(loss, metrics) of a preference batch: sums over its pairs divided by `pair_total` (the
  whole batch's pairs; default this batch's), so micro-batches add up to the batch's means."""
  ref = reference_logps(params, cfg, batch)
  logps, counts = sequence_logps(split_reference(params)[0], cfg, batch,
                                 deterministic=deterministic, rngs=rngs)
  (pc, pr), (rc, rr), (nc, nr) = pairs(logps), pairs(ref), pairs(counts)
  valid = (nc > 0).astype(jnp.float32)
  loss, chosen_rewards, rejected_rewards = pair_losses(pc, pr, rc, rr, nc, nr, settings)
  total = jnp.maximum(jnp.sum(valid), 1.0) if pair_total is None else pair_total
  mean = lambda x: jnp.sum(x * valid) / total
  chosen_rewards = jax.lax.stop_gradient(chosen_rewards)
  rejected_rewards = jax.lax.stop_gradient(rejected_rewards)
  metrics = {"pairs": jnp.sum(valid), "rewards/chosen": mean(chosen_rewards), "rewards/rejected": mean(rejected_rewards),
             "rewards/margins": mean(chosen_rewards - rejected_rewards),
             "rewards/accuracies": mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
             "logps/chosen": mean(jax.lax.stop_gradient(pc)),
             "logps/rejected": mean(jax.lax.stop_gradient(pr)),
             "accuracy/reward": mean(ties_half(chosen_rewards - rejected_rewards)),
             "accuracy/logp": mean(ties_half(jax.lax.stop_gradient(pc - pr)))}
  return mean(loss), metrics


def ties_half(margin):
  """1 where margin > 0, 0.5 where it is 0, else 0."""
  return (margin > 0).astype(jnp.float32) + 0.5 * (margin == 0).astype(jnp.float32)
