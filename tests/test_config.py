"""model/config.py: presets, validation that names the bad field, replace()."""

import pytest

from model.config import ModelConfig, get_config
from model.errors import UserError


@pytest.mark.parametrize("overrides, field", [
    (dict(d_model=30, num_heads=4), "d_model"),
    (dict(num_layers=0), "num_layers"),
    (dict(num_heads=-1), "num_heads"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(d_mlp=0), "d_mlp"),
    (dict(padded_vocab_size=100), "padded_vocab_size"),
    (dict(activation="swish"), "activation"),
    (dict(position_embedding="rope"), "position_embedding"),
    (dict(norm_placement="middle"), "norm_placement"),
    (dict(attention="flash"), "attention"),
    (dict(dtype="float64"), "dtype"),
    (dict(remat="everything"), "remat"),
    (dict(attn_dropout=1.0), "attn_dropout"),
    (dict(scan_layers="yes"), "scan_layers"),
    (dict(num_experts=-1), "num_experts"),
])
def test_config_validation_names_field(overrides, field):
  with pytest.raises(UserError, match=field):
    get_config("tiny", **overrides)


def test_config_replace_and_presets():
  with pytest.raises(UserError, match="'gpt5'"):
    get_config("gpt5")
  with pytest.raises(UserError, match="'n_embd'"):
    get_config("tiny").replace(n_embd=32)
  cfg = get_config("tiny").replace(d_model=32)
  assert cfg.d_mlp == 128 and cfg.head_dim == 8
  assert hash(cfg) == hash(get_config("tiny", d_model=32))


def test_an_encoder_decoder_may_have_unequal_halves():
  cfg = ModelConfig(family="encdec", d_model=24, num_heads=2, d_mlp=96, num_decoder_heads=6,
                    decoder_d_mlp=160, num_layers=3, num_decoder_layers=1)
  assert (cfg.decoder_heads, cfg.decoder_mlp, cfg.decoder_layers) == (6, 160, 1)
  dec = cfg.decoder()
  assert (dec.num_heads, dec.head_dim, dec.d_mlp) == (6, 4, 160)
  alike = ModelConfig(family="encdec", d_model=24, num_heads=2)
  assert alike.decoder() is alike and (alike.decoder_heads, alike.decoder_mlp) == (2, 96)
  with pytest.raises(UserError, match=r"d_model \(24\) must be divisible by num_decoder_heads "
                                      r"\(5\)"):
    ModelConfig(family="encdec", d_model=24, num_heads=2, num_decoder_heads=5)
  with pytest.raises(UserError, match="num_decoder_heads applies to family='encdec'"):
    ModelConfig(num_decoder_heads=4)
  with pytest.raises(UserError, match="decoder_d_mlp must be a whole number >= 0, got -1"):
    ModelConfig(family="encdec", decoder_d_mlp=-1)
