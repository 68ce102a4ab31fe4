"""model/config.py: presets, validation that names the bad field, replace()."""

import pytest

from model.config import get_config
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
    (dict(num_experts=8), "num_experts"),
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
