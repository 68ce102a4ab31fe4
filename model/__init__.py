"""The Transformer family (GPT-2, a BERT-style encoder, the encoder-decoder): config, Flax
modules, sampling, tokenizers, Hugging Face import.

    from model import ModelConfig, build, get_config, init_params
    module = build(cfg)          # GPT, Encoder or EncoderDecoder, by cfg.family
    from model.hf import load_hf   # (also model.pretrained.load_hf)
    cfg, params = load_hf("path/to/checkpoint")   # GPT-2, BERT or BART, by model_type

Where things are: config.py (ModelConfig), presets.py (the named shapes), blocks.py (the shared
blocks and the shape letters), moe.py (the mixture-of-experts MLP), gpt.py / encoder.py /
encdec.py (one family each), families.py (the family's module,
init_params, parameter counts), layout.py (loop and scan layouts), attention.py (which kernel),
kv_cache.py, decode/ (generation), hf/ (Hugging Face checkpoints), tokenizer.py, errors.py.

The names below are imported on first use, so that `model.errors` (the error type every package
raises) can be imported without loading jax and flax, e.g. by the gcloud launcher.
"""

import importlib

_EXPORTS = {
    "ModelConfig": "model.config", "get_config": "model.config", "preset_names": "model.config",
    "GPT": "model.gpt", "Encoder": "model.encoder", "EncoderDecoder": "model.encdec",
    "build": "model.families", "init_params": "model.families", "abstract_params": "model.families",
    "count_params": "model.families", "num_params": "model.families",
    "init_cache": "model.kv_cache", "load_hf": "model.hf",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'model' has no attribute {name!r}")
