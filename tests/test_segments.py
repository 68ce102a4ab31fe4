"""model/segments.py (segment ids, positions, the prefix-LM prefix, the visibility rule), the
arguments model/attention.py builds for cuDNN's packed layout, which kernel each setting picks
for packed rows, and the config errors of data.document_mask and model.prefix_lm."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import exit_status
from launch import train as train_cli
from model import attention, segments
from model.config import ModelConfig
from model.errors import UserError
from training.lm_inputs import lm_inputs

# Two rows: three documents and padding; one segment whose ids skip (1, 3) and padding inside.
SEGMENTS = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0],
                     [4, 4, 4, 4, 4, 4, 0, 0, 1, 1, 1]], np.int32)


def test_positions_restart_at_each_segment():
  got = np.asarray(segments.positions_from_segments(jnp.asarray(SEGMENTS)))
  np.testing.assert_array_equal(got, [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1],
                                      [0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2]])


def test_each_end_of_text_starts_the_document_after_it():
  eot = 9
  tokens = jnp.asarray([[5, 6, 9, 7, 8, 9, 9, 1], [9, 1, 2, 3, 4, 5, 6, 7]])
  seg = np.asarray(segments.document_segments(tokens, eot))
  np.testing.assert_array_equal(seg, [[1, 1, 2, 2, 2, 3, 4, 4], [2, 2, 2, 2, 2, 2, 2, 2]])
  np.testing.assert_array_equal(segments.positions_from_segments(jnp.asarray(seg)),
                                [[0, 1, 0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])


def test_the_prefix_ends_with_the_token_that_predicts_the_first_scored_target():
  # Output t scored (its target is token t + 1): segment 1's first scored output is at 1, so
  # tokens 0 and 1 are its prefix; segment 2 scores from its first token (prefix: token 3);
  # segment 3 from 7 (prefix 5, 6, 7); padding is never prefix.
  weights = np.array([[0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0],
                      [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]], np.float32)
  got = np.asarray(segments.prefix_from_weights(jnp.asarray(SEGMENTS), jnp.asarray(weights)))
  np.testing.assert_array_equal(got.astype(int), [[1, 1, 0, 1, 0, 1, 1, 1, 0, 0, 0],
                                                  [1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0]])


def test_the_visibility_rule():
  """segments.visible against the rule written out per pair, on random rows."""
  rng = np.random.default_rng(0)
  seg = np.sort(rng.integers(0, 4, (3, 12)), axis=1).astype(np.int32)
  prefix = rng.random((3, 12)) < 0.5
  for use_prefix in (False, True):
    got = np.asarray(segments.visible(jnp.asarray(seg), jnp.asarray(prefix) if use_prefix
                                      else None))
    assert got.shape == (3, 1, 12, 12)
    for b, i, j in itertools.product(range(3), range(12), range(12)):
      want = seg[b, i] == seg[b, j] and (j <= i or (use_prefix and prefix[b, i]
                                                   and prefix[b, j]))
      assert got[b, 0, i, j] == want, (b, i, j, use_prefix)


def test_a_packed_batch_reads_as_the_interface_says():
  """tokens | segment_ids | loss_mask, T + 1 wide each: inputs [:T], targets [1:], weights where
  the mask is set and the target stays in the input's non-padding segment."""
  tok = np.arange(10, 21)
  seg = np.array([1, 1, 1, 2, 2, 2, 2, 0, 0, 3, 3])
  mask = np.array([0, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1])  # set at a segment start and on padding
  batch = jnp.asarray(np.concatenate([tok, seg, mask])[None], jnp.int32)
  lm = lm_inputs(ModelConfig(prefix_lm=True), batch, "packed")
  np.testing.assert_array_equal(lm.inputs_BT, tok[None, :10])
  np.testing.assert_array_equal(lm.targets_BT, tok[None, 1:])
  np.testing.assert_array_equal(lm.segment_ids_BT, seg[None, :10])
  np.testing.assert_array_equal(lm.weights_BT, [[1, 1, 0, 1, 1, 1, 0, 0, 0, 1]])
  np.testing.assert_array_equal(lm.prefix_BT, [[1, 0, 0, 1, 0, 0, 0, 0, 0, 1]])
  assert lm_inputs(ModelConfig(), batch, "packed").prefix_BT is None


# --- cuDNN's packed layout ----------------------------------------------------------------------


def test_cudnn_packed_layout_arguments():
  lengths, offsets = (np.asarray(a) for a in attention.cudnn_packed_layout(
      jnp.asarray(SEGMENTS)))
  assert lengths.shape == (2, 11) and offsets.shape == (2, 12)
  assert lengths.dtype == offsets.dtype == np.int32
  np.testing.assert_array_equal(lengths[0, :5], [3, 2, 4, 2, -1])
  np.testing.assert_array_equal(offsets[0, :5], [0, 3, 5, 9, -1])
  np.testing.assert_array_equal(lengths[1, :4], [6, 2, 3, -1])
  np.testing.assert_array_equal(offsets[1, :4], [0, 6, 8, -1])
  assert (lengths[:, 5:] == -1).all() and (offsets[:, 5:] == -1).all()


def test_cudnn_packed_layout_is_what_cudnn_reads():
  """JAX's own checks and conversion of the arguments (jax._src.cudnn: check_layout, and
  _fix_seqlen_offsets, which turns them into cuDNN's ragged offsets over the flattened batch)
  give each run's tokens; attention over each such sequence equals the reference attention
  with the segment mask (what the GPU kernel computes, if it keeps its contract)."""
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=import-outside-toplevel
  B, T, H, K = 2, 11, 2, 8
  q, k, v = (jax.random.normal(jax.random.key(i), (B, T, H, K), jnp.float32).astype(
      jnp.bfloat16) for i in range(3))
  lengths, offsets = attention.cudnn_packed_layout(jnp.asarray(SEGMENTS))
  fa.check_layout(q, k, v, None, lengths, lengths, offsets, offsets, None, None,
                  fa.AttentionLayout.BTNH)
  flat_len, _, flat_off, _ = (np.asarray(a).ravel() for a in fa._fix_seqlen_offsets(  # pylint: disable=protected-access
      lengths, lengths, offsets, offsets, q, k))
  runs = int((np.asarray(lengths) > 0).sum())
  starts = flat_off[:runs] // (H * K)  # cuDNN's offsets are in elements of [B * T, H, K]
  assert flat_off[runs] == B * T * H * K and flat_len[:runs].sum() == B * T
  q32, k32, v32 = (np.asarray(x, np.float32).reshape(B * T, H, K) for x in (q, k, v))
  out = np.zeros_like(q32)
  for start, n in zip(starts, flat_len[:runs]):
    s = np.einsum("thk,shk->hts", q32[start:start + n], k32[start:start + n]) / np.sqrt(K)
    s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    out[start:start + n] = np.einsum("hts,shk->thk", p / p.sum(-1, keepdims=True),
                                     v32[start:start + n])
  want = attention.reference_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
                                       segments.visible(jnp.asarray(SEGMENTS)))
  np.testing.assert_allclose(out.reshape(B, T, H, K), np.asarray(want), rtol=1e-5, atol=1e-6)


# --- which kernel -------------------------------------------------------------------------------


def test_which_kernel_packed_rows_get(monkeypatch):
  pick, describe = attention.implementation, attention.describe
  auto, bf16 = ModelConfig(), ModelConfig(dtype="bfloat16")
  assert pick(auto, 1024, False, "tpu", segments=True, prefix=True) == "splash"
  assert pick(bf16, 1024, False, "gpu", segments=True) == "cudnn"
  assert describe(bf16, 1024, False, "gpu", segments=True) == "cudnn, with segment ids"
  # the prefix-LM mask: auto leaves cuDNN, says why; cuDNN asked for is one sentence
  assert pick(bf16, 1024, False, "gpu", segments=True, prefix=True) == "dot_product"
  assert describe(bf16, 1024, False, "gpu", segments=True, prefix=True) == (
      "dot_product, with segment ids and the prefix-LM mask (auto: cuDNN cannot take the "
      "prefix-LM mask)")
  cudnn = ModelConfig(attention="cudnn", dtype="bfloat16")
  with pytest.raises(UserError, match=r"^model.attention='cudnn' cannot take the prefix-LM "
                                      r"mask .*; use model.attention=auto or xla.$"):
    pick(cudnn, 1024, False, "gpu", segments=True, prefix=True)
  assert pick(ModelConfig(attention="splash"), 256, False, "cpu", segments=True,
              prefix=True) == "splash"
  # a GPU before Hopper has no packed layout (no such GPU here: its answer is replaced)
  monkeypatch.setattr(attention, "cudnn_takes_segments", lambda: False)
  assert pick(bf16, 1024, False, "gpu") == "cudnn"
  assert pick(bf16, 1024, False, "gpu", segments=True) == "dot_product"
  assert describe(bf16, 1024, False, "gpu", segments=True).endswith(
      "(auto: cuDNN's packed layout needs a Hopper or later GPU)")
  with pytest.raises(UserError, match="Hopper or later"):
    pick(cudnn, 1024, False, "gpu", segments=True)


# --- bad config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,message", [
    (["--config.data.document_mask=true"],
     "error: config.data.document_mask=true splits windows at the end-of-text token, and the "
     "'char' tokenizer has none; use data.tokenizer=gpt2 or hf:DIR (its end-of-sequence "
     "token), or document_mask=false."),
    (["--config.model.prefix_lm=true"],
     "error: config.model.prefix_lm=True is the prefix-LM objective's; it is set by "
     "data.task=prefix_lm, not with data.task='lm'."),
])
def test_bad_segment_settings_are_one_sentence(tmp_path, capsys, flags, message):
  workdir = tmp_path / "run"
  assert exit_status(train_cli.main, ["--config", "configs/tiny.py", "--workdir",
                                      str(workdir), *flags]) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == message
  assert not workdir.exists()
