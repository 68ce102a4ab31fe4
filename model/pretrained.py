"""The Hugging Face converters' public names under their earlier module (they live in model/hf/):
`load_hf`, `load_hf_gpt2`, `save_hf_gpt2`, `checkpoint_config`, `resolve_checkpoint_dir`."""

from model.hf import (CONFIG_FILE, HF_NAMES, checkpoint_config, load_hf, load_hf_gpt2,
                      resolve_checkpoint_dir, save_hf_gpt2)
from model.hf.gpt2 import config_from_hf

__all__ = ["CONFIG_FILE", "HF_NAMES", "checkpoint_config", "config_from_hf", "load_hf",
           "load_hf_gpt2", "resolve_checkpoint_dir", "save_hf_gpt2"]
