"""GPT-2-family model: config, Flax modules, sampling, tokenizers, Hugging Face import.

    from model import GPT, ModelConfig, get_config, init_params

The names below are imported on first use, so that `model.errors` (the error type every package
raises) can be imported without loading jax and flax, e.g. by the gcloud launcher.
"""

import importlib

_EXPORTS = {
    "ModelConfig": "model.config", "get_config": "model.config", "preset_names": "model.config",
    "GPT": "model.transformer", "init_cache": "model.transformer",
    "init_params": "model.transformer", "abstract_params": "model.transformer",
    "count_params": "model.transformer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'model' has no attribute {name!r}")
