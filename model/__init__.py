"""GPT-2-family model: config, Flax modules, sampling, tokenizers, Hugging Face import."""

from model.config import ModelConfig, get_config, preset_names
from model.transformer import GPT, init_cache, init_params, abstract_params, count_params

__all__ = ["ModelConfig", "get_config", "preset_names", "GPT", "init_cache", "init_params",
           "abstract_params", "count_params"]
