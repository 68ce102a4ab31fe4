"""A training run's checkpoint as a Hugging Face checkpoint (behind `launch.export`): a GPT-2
run as GPT2LMHeadModel, a Llama-style one (rotary, RMSNorm, SwiGLU, grouped-query attention)
as LlamaForCausalLM.

    report = export_hf("runs/x", "hf/x")          # latest checkpoint; step=N for another
    transformers.AutoModelForCausalLM.from_pretrained("hf/x")   # the same logits

Writes config.json and model.safetensors (float32; padded vocabulary rows dropped;
model/hf/__init__.py: save_hf), and the tokenizer: GPT-2 BPE runs get Hugging Face's
tokenizer files (model/hf/tokenizer.py), character runs their vocabulary as
flaxgpt_tokenizer.json (transformers has no character tokenizer: id i is the i-th character of
its "chars"). The output folder must be new or empty unless `force`; everything is written into
a temporary sibling folder that replaces the output only once complete, so a failure leaves
the output as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from model import hf
from model.errors import UserError
from model.hf.tokenizer import save_hf_gpt2_tokenizer
from model.tokenizer import tokenizer_from_dict
from training.weights import WORKDIR, describe_weights, load_weights

CHAR_VOCAB_FILE = "flaxgpt_tokenizer.json"


def check_out(out: str | os.PathLike, force: bool) -> str:
  """The output folder's path if it may be written: new, empty, or (force) to be replaced."""
  out = os.path.abspath(os.fspath(out))
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out {out!r} is a file, not a folder.")
  if os.path.isdir(out) and os.listdir(out) and not force:
    entries = sorted(os.listdir(out))
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise UserError(f"--out {out!r} is not empty (it holds {shown}); choose a new or empty "
                    f"folder, or pass --force to replace it.")
  parent = os.path.dirname(out)
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent and not os.path.isdir(parent):
    raise UserError(f"--out {out!r} cannot be created: {parent!r} is a file, not a folder.")
  if parent and not os.access(parent, os.W_OK):
    raise UserError(f"--out {out!r} cannot be created: {parent!r} is not writable.")
  return out


def export_hf(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
              force: bool = False) -> dict[str, Any]:
  """Exports the run's latest (or `step`) checkpoint to `out`; returns what was written:
  out, step, files, tokenizer ("gpt2" or "char"), vocab_size, block_size."""
  out = check_out(out, force)
  if "://" not in os.fspath(workdir):
    run = os.path.realpath(os.fspath(workdir))
    real_out = os.path.realpath(out)
    if run == real_out or run.startswith(real_out.rstrip(os.sep) + os.sep):
      raise UserError(f"--out {out!r} would replace the run itself (--workdir "
                      f"{os.fspath(workdir)!r} is {'it' if run == real_out else 'inside it'}); "
                      f"export to another folder.")
  described = describe_weights(workdir, step=step, kind=WORKDIR)
  kind = hf.export_type(described.cfg)
  tokenizer = tokenizer_from_dict(described.tokenizer or {"name": "gpt2"})
  w = load_weights(workdir, step=step, kind=WORKDIR)
  tmp = f"{out}.export-tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    hf.save_hf(w.params, w.cfg, tmp)
    files = [hf.CONFIG_FILE, hf.WEIGHTS_FILE]
    if tokenizer.name == "gpt2":
      files += save_hf_gpt2_tokenizer(tokenizer, tmp, model_max_length=w.cfg.block_size)
    else:
      with open(os.path.join(tmp, CHAR_VOCAB_FILE), "w", encoding="utf-8") as f:
        json.dump(tokenizer.to_dict(), f, ensure_ascii=False, indent=2)
      files.append(CHAR_VOCAB_FILE)
    _replace(tmp, out)
  except UserError:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  except Exception as e:  # pylint: disable=broad-except  (a full disk: OSError, safetensors' own)
    shutil.rmtree(tmp, ignore_errors=True)
    reason = getattr(e, "strerror", None) or str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f"Writing the export next to {out!r} failed ({reason}); --out is as it "
                    f"was.") from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"out": out, "step": w.step, "files": files, "model_type": kind,
          "hf_class": hf.HF_CLASSES[kind],
          "tokenizer": tokenizer.name,
          "vocab_size": w.cfg.vocab_size, "block_size": w.cfg.block_size}


def _replace(tmp: str, out: str) -> None:
  """Puts the finished folder `tmp` at `out` (an old `out` is removed only afterwards)."""
  if not os.path.exists(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    os.rename(tmp, out)
    return
  old = f"{out}.export-old-{os.getpid()}"
  os.rename(out, old)
  os.rename(tmp, out)
  shutil.rmtree(old, ignore_errors=True)
