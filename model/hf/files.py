"""A Hugging Face checkpoint's files: where it is (a local directory, or a Hub name downloaded
once), its config.json, and its tensors (model.safetensors, a sharded index of them, or
pytorch_model.bin read with torch), read as numpy arrays. No torch is needed for safetensors
checkpoints."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from model.errors import NotFoundError, UserError

HF_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_ORG = "openai-community"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"


def tensor_names(directory: str) -> list[str]:
  """The tensor names of a checkpoint (safetensors headers only; a PyTorch file is read)."""
  single = os.path.join(directory, WEIGHTS_FILE)
  index = os.path.join(directory, WEIGHTS_INDEX_FILE)
  if os.path.isfile(single):
    from safetensors import SafetensorError, safe_open
    try:
      with safe_open(single, "np") as f:
        return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
      raise UserError(f"{single} is not a readable safetensors file ({e}).") from None
  if os.path.isfile(index):
    return list(_weight_map(index))
  return list(read_hf_tensors(directory)[0])


def resolve_checkpoint_dir(name_or_path: str | os.PathLike) -> str:
  """A local directory as is; a GPT-2 name (or "owner/repo") through the Hugging Face Hub."""
  path = os.fspath(name_or_path)
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise UserError(f"Checkpoint path {path!r} is a file; pass the directory holding "
                    f"{CONFIG_FILE} and {WEIGHTS_FILE}.")
  if path in HF_NAMES:
    return _download(f"{HF_ORG}/{path}", path)
  if _looks_like_repo_id(path):  # any family: its tokenizer files too
    return _download(path, path, TOKENIZER_PATTERNS)
  raise NotFoundError(
      f"Checkpoint directory {path!r} does not exist; pass a directory holding {CONFIG_FILE} "
      f"and {WEIGHTS_FILE}, or one of {', '.join(HF_NAMES)}.")


def _looks_like_repo_id(path: str) -> bool:
  parts = path.split("/")
  return len(parts) == 2 and all(parts) and not path.startswith((".", "~"))


# What a BERT / BART repository's tokenizer needs (model/hf/tokenizer.py).
TOKENIZER_PATTERNS = ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                      "special_tokens_map.json")


def _download(repo_id: str, name: str, extra: tuple[str, ...] = ()) -> str:
  try:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors
  except ImportError:
    raise UserError(f"Loading {name!r} by name needs huggingface_hub (pip install "
                    f"'flaxgpt[hf]'); or pass a local checkpoint directory.") from None
  try:
    return snapshot_download(repo_id, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, *extra])
  except hf_errors.RepositoryNotFoundError:
    raise UserError(
        f"Unknown checkpoint {name!r}: no such local directory, and the Hugging Face Hub has "
        f"no (public) repository {repo_id!r}; use one of {', '.join(HF_NAMES)} or a local "
        f"checkpoint directory.") from None
  except Exception as e:  # no network, offline mode, ...
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise NotFoundError(
        f"Could not download {name!r} ({repo_id}) from the Hugging Face Hub, and it is no "
        f"local directory (no network? {reason}); download {CONFIG_FILE} and {WEIGHTS_FILE} "
        f"elsewhere and pass their local directory instead.") from None


def read_hf_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise NotFoundError(f"{path} not found: a Hugging Face GPT-2 checkpoint directory "
                        f"needs {CONFIG_FILE} and {WEIGHTS_FILE}.")
  try:
    with open(path, encoding="utf-8") as f:
      hf_config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON ({e}).") from None
  if not isinstance(hf_config, dict):
    raise UserError(f"{path} must hold a JSON object, got {type(hf_config).__name__}.")
  return hf_config


def _weight_map(index: str) -> dict[str, str]:
  """A sharded checkpoint's index: tensor name -> shard file."""
  try:
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
    if not isinstance(weight_map, dict):
      raise TypeError(f"weight_map is a {type(weight_map).__name__}, not an object")
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"{index} is not a valid safetensors index ({e!r}).") from None
  return weight_map


def read_hf_tensors(directory: str) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of the checkpoint as numpy arrays, and the weights file they came from."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  single = os.path.join(directory, WEIGHTS_FILE)
  index = os.path.join(directory, WEIGHTS_INDEX_FILE)
  torch_file = os.path.join(directory, TORCH_WEIGHTS_FILE)
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    shards = sorted(set(_weight_map(index).values()))
    files = [os.path.join(directory, s) for s in shards]
  elif os.path.isfile(torch_file):
    return _read_torch_tensors(torch_file), torch_file
  else:
    raise NotFoundError(f"{single} not found: a Hugging Face GPT-2 checkpoint directory "
                        f"needs {CONFIG_FILE} and {WEIGHTS_FILE} (or {TORCH_WEIGHTS_FILE}, "
                        f"read with torch when it is installed).")
  tensors = {}
  for path in files:
    if not os.path.isfile(path):
      raise NotFoundError(f"{path} (listed in {index}) not found.")
    try:
      tensors.update(load_file(path))
    except (SafetensorError, OSError, ValueError) as e:
      raise UserError(f"{path} is not a readable safetensors file ({e}).") from None
  return tensors, files[0] if len(files) == 1 else index


def _read_torch_tensors(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise NotFoundError(
        f"{path} is a PyTorch checkpoint and has no {WEIGHTS_FILE} next to it; install torch "
        f"to read it, or convert it with transformers "
        f"(save_pretrained(..., safe_serialization=True)).") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # corrupt or not a state dict
    raise UserError(f"{path} is not a readable PyTorch state dict ({e}).") from None
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
          for k, v in state.items()}


def write_checkpoint(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                     hf_config: dict[str, Any]) -> None:
  """Writes `path`/model.safetensors (the tensors, as given) and config.json, what
  `from_pretrained` reads; the weights file gets the permissions of any new file."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  weights = os.path.join(path, WEIGHTS_FILE)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, weights,
            metadata={"format": "pt"})
  umask = os.umask(0)  # safetensors writes 0600
  os.umask(umask)
  os.chmod(weights, 0o666 & ~umask)
  with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(hf_config, f, indent=2)
