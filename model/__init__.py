"""The Transformer family (GPT-2, a BERT-style encoder, the encoder-decoder): config, Flax
modules, sampling, tokenizers, Hugging Face import.

    from model import ModelConfig, build, get_config, init_params
    module = build(cfg)          # GPT, Encoder or EncoderDecoder, by cfg.family
    from model.pretrained import load_hf
    cfg, params = load_hf("path/to/checkpoint")   # GPT-2, BERT or BART, by model_type

The names below are imported on first use, so that `model.errors` (the error type every package
raises) can be imported without loading jax and flax, e.g. by the gcloud launcher.
"""

import importlib

_EXPORTS = {
    "ModelConfig": "model.config", "get_config": "model.config", "preset_names": "model.config",
    "GPT": "model.transformer", "init_cache": "model.transformer",
    "init_params": "model.transformer", "abstract_params": "model.transformer",
    "count_params": "model.transformer", "build": "model.transformer",
    "Encoder": "model.encoder", "EncoderDecoder": "model.encdec",
    "load_hf": "model.pretrained",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'model' has no attribute {name!r}")
