"""A training run's checkpoint as a Hugging Face checkpoint (behind `launch.export`): a GPT-2
run as GPT2LMHeadModel, a Llama-style one (rotary, RMSNorm, SwiGLU, grouped-query attention)
as LlamaForCausalLM; a LoRA run as a PEFT adapter directory (adapter_config.json naming its
base, adapter_model.safetensors: model/hf/peft.py), or merged into its base as the whole model.

    report = export_hf("runs/x", "hf/x")          # latest checkpoint; step=N for another
    transformers.AutoModelForCausalLM.from_pretrained("hf/x")   # the same logits

Writes config.json and model.safetensors (float32; padded vocabulary rows dropped;
model/hf/__init__.py: save_hf), the tokenizer, and in TOKENIZER_RECORD_FILE what the ids mean
(training/weights.py reads it back, so `launch.sample --init_from` and `launch.eval
--init_from` read every export with its own tokenizer): GPT-2 BPE runs get Hugging Face's
tokenizer files (model/hf/tokenizer.py), `hf:DIR` runs a copy of DIR's tokenizer files (the
content the run recorded), character runs their vocabulary (transformers has no character
tokenizer: id i is the i-th character of "chars").

The output folder must be new or empty unless `force`, and never a run's workdir, inside one,
or (with force) holding one (training/workdir.py). Everything is written into a temporary
folder beside it, which is put in place only if the output is still what was checked (absent
or empty; with force, the same folder), so of two exports to one folder the later one fails
with a sentence and a failure or Ctrl-C leaves the output as it was.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import tempfile
from typing import Any

import jax

from model import hf, lora
from model.errors import UserError
from model.hf import peft
from model.hf.tokenizer import TOKENIZER_FILES, content_sha256, save_hf_gpt2_tokenizer
from model.tokenizer import tokenizer_from_dict
from training.adapters import META_KEY
from training.checkpoint import read_run_meta
from training.interrupts import uninterrupted
from training.weights import TOKENIZER_RECORD_FILE, WORKDIR, describe_weights, load_weights
from training.workdir import enclosing_workdir, workdir_within


@dataclasses.dataclass(frozen=True)
class Target:
  """The output folder as checked: `replaces` is (device, inode) of the non-empty folder that
  --force replaces, None when it was absent or empty."""
  path: str
  replaces: tuple[int, int] | None


def check_out(out: str | os.PathLike, force: bool, workdir: str | os.PathLike | None = None
              ) -> Target:
  """The output folder if it may be written: new, empty, or (force) to be replaced, and in no
  run's workdir (`workdir`: the run being exported, named as such)."""
  out = os.path.abspath(os.fspath(out))
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out {out!r} is a file, not a folder.")
  real = os.path.realpath(out)
  exported = None if workdir is None else os.path.realpath(os.fspath(workdir))
  if exported is not None and os.path.commonpath([real, exported]) == real:
    raise UserError(f"--out {out!r} would replace the run itself (--workdir "
                    f"{os.fspath(workdir)!r} is {'it' if real == exported else 'inside it'}); "
                    f"export to another folder.")
  run = enclosing_workdir(real)
  if run is not None:
    whose = "the run being exported" if run == exported else "a training run"
    raise UserError(f"--out {out!r} is inside {run!r}, the workdir of {whose}; an export never "
                    f"writes into a run's workdir: choose a folder outside it.")
  entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
  if entries and not force:
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise UserError(f"--out {out!r} is not empty (it holds {shown}); choose a new or empty "
                    f"folder, or pass --force to replace it.")
  run = workdir_within(real) if entries else None
  if run is not None:
    raise UserError(f"--out {out!r} holds {run!r}, the workdir of a training run, which --force "
                    f"would delete; choose another folder.")
  parent = os.path.dirname(out)
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent and not os.path.isdir(parent):
    raise UserError(f"--out {out!r} cannot be created: {parent!r} is a file, not a folder.")
  if parent and not os.access(parent, os.W_OK):
    raise UserError(f"--out {out!r} cannot be created: {parent!r} is not writable.")
  stat = os.stat(out) if entries else None
  return Target(out, None if stat is None else (stat.st_dev, stat.st_ino))


def export_hf(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
              force: bool = False, merge: bool = False) -> dict[str, Any]:
  """Exports the run's latest (or `step`) checkpoint to `out`; returns what was written:
  out, step, files, model_type, hf_class (its transformers class), adapter (whether `out` is
  a PEFT adapter directory), tokenizer ("gpt2", "char" or "hf"), vocab_size, block_size. A LoRA run is written as a PEFT
  adapter directory (model/hf/peft.py) naming its base, or with `merge` as the whole model
  with the adapters folded in."""
  local = "://" not in os.fspath(workdir)
  target = check_out(out, force, workdir if local else None)
  out = target.path
  described = describe_weights(workdir, step=step, kind=WORKDIR)
  if merge and not described.cfg.lora_rank:
    raise UserError(f"--merge folds a LoRA run's adapters into its base; {described.label} is "
                    f"a full fine-tune, exported whole without it.")
  kind = hf.export_type(described.cfg)
  record = described.tokenizer or {"name": "gpt2"}
  tokenizer = tokenizer_from_dict(record)  # an hf:DIR run's files: checked against the record
  w = load_weights(workdir, step=step, kind=WORKDIR)
  adapter = bool(w.cfg.lora_rank) and not merge
  try:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{os.path.basename(out)}.export-tmp-",
                           dir=os.path.dirname(out))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's is 0700; --out gets a new folder's mode
  except OSError as e:
    raise UserError(f"--out {out!r} cannot be written: {e.strerror or e}.") from None
  try:
    if adapter:
      base = read_run_meta(workdir, w.step)[1][META_KEY]["init_from"]
      files = peft.save_adapter(jax.device_get(w.params), w.cfg, kind, tmp, base)
    else:
      params = jax.jit(lora.merge_weights, static_argnums=1)(w.params, w.cfg)
      hf.save_hf(jax.device_get(params), lora.without_lora(w.cfg), tmp)
      files = [hf.CONFIG_FILE, hf.WEIGHTS_FILE]
    files += _save_tokenizer(tokenizer, record, tmp, w.cfg.block_size)
    with uninterrupted(f"{out} was written completely before it stopped"):
      _put_in_place(tmp, target)
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
          "hf_class": hf.HF_CLASSES[kind], "adapter": adapter, "tokenizer": record["name"],
          "vocab_size": w.cfg.vocab_size, "block_size": w.cfg.block_size}


def _save_tokenizer(tokenizer, record: dict, folder: str, block_size: int) -> list[str]:
  """The tokenizer's files in `folder` and TOKENIZER_RECORD_FILE; returns the file names."""
  files = []
  if record["name"] == "gpt2":
    files += save_hf_gpt2_tokenizer(tokenizer, folder, model_max_length=block_size)
  elif record["name"] == "hf":  # the files the run recorded (tokenizer_from_dict checked them)
    for name in TOKENIZER_FILES:
      source = os.path.join(record["path"], name)
      if os.path.isfile(source):
        shutil.copyfile(source, os.path.join(folder, name))
        files.append(name)
    record = {"name": "hf", "vocab_size": tokenizer.vocab_size,
              "sha256": content_sha256(folder)}
  with open(os.path.join(folder, TOKENIZER_RECORD_FILE), "w", encoding="utf-8") as f:
    json.dump(record, f, ensure_ascii=False, indent=2)
  return files + [TOKENIZER_RECORD_FILE]


def _changed(out: str) -> UserError:
  return UserError(f"--out {out!r} changed while this export was being written (another export "
                   f"to the same folder?); this export was discarded and --out left as it is.")


def _put_in_place(tmp: str, target: Target) -> None:
  """Renames the finished folder `tmp` to the output, only if the output is still what was
  checked: a rename replaces an absent or empty folder, never a non-empty one; with --force,
  the folder checked is moved aside first (and removed once the new one is in place)."""
  out = target.path
  if target.replaces is None:
    try:
      os.rename(tmp, out)
    except OSError as e:
      if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
        raise _changed(out) from None
      raise
    return
  old = f"{tmp}-replaced"
  try:
    os.rename(out, old)
  except FileNotFoundError:
    raise _changed(out) from None
  stat = os.stat(old)
  if (stat.st_dev, stat.st_ino) != target.replaces:
    os.rename(old, out)  # not the folder checked: put it back
    raise _changed(out)
  try:
    os.rename(tmp, out)
  except OSError:
    os.rename(old, out)
    raise _changed(out) from None
  shutil.rmtree(old, ignore_errors=True)
