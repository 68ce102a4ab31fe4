"""python -m launch.sample end to end (launch.sample.main in process; a real process where the
process is the point) from a launch.train checkpoint and from a Hugging Face checkpoint, its
one-sentence errors, and its prompt and output helpers."""

import io
import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import exit_status
from launch import sample as sample_cli
from launch.sample import StreamPrinter, format_sample
from model.decode import sampling
from model.hf import load_hf_gpt2
from model.decode.sampling import generate
from model.tokenizer import CharTokenizer, get_tokenizer, tokenizer_from_dict
from training.checkpoint import load_for_inference

REPO = pathlib.Path(__file__).resolve().parents[1]
HF_DIR = REPO / "tests" / "fixtures" / "hf_gpt2_tiny"  # vocab 96: GPT-2 ids 0..95, block 32
RECORD_KEYS = {"prompt_index", "sample_index", "prompt", "completion", "token_ids",
               "num_tokens", "stop_reason", "seconds", "tokens_per_sec"}
HF_PROMPTS = ("Q@Z", "(x)")  # GPT-2 BPE ids below 96


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """For the real processes: no FLAXGPT_GPT2_BPE: the packaged BPE ranks; the Hub offline."""
  e = dict(os.environ)  # keeps conftest's XLA_FLAGS
  e.pop("FLAXGPT_GPT2_BPE", None)
  e.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
           HF_HOME=str(tmp_path_factory.mktemp("hf_home")))
  return e


@pytest.fixture(scope="module")
def gpt2():
  return get_tokenizer("gpt2")


def _run(args, env, timeout=120):
  return subprocess.run([sys.executable, "-m", "launch.sample", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _sample(capsys, args):
  """launch.sample.main(args) in process: (exit status, stdout, stderr)."""
  status = exit_status(sample_cli.main, [str(a) for a in args])
  out = capsys.readouterr()
  return status, out.out, out.err


@pytest.fixture(scope="module")
def workdir(tiny_run):
  """conftest's tiny launch.train run of configs/tiny.py (a character model, block 64; 20
  steps, checkpoints at 10 and 20)."""
  return tiny_run[0]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
  path.write_text("ROMEO:\n---\nJULIET:\nO\n")
  return path


def _records(result):
  status, stdout, stderr = result
  assert status == 0, stderr
  return [json.loads(line) for line in stdout.splitlines()]


def _check_against_generate(records, params, cfg, tokenizer, prompts, num_samples,
                            **settings):
  """The CLI's samples equal model.decode.sampling.generate's with the same settings,
  prompt-major."""
  rows = [tokenizer.encode(p) for p in prompts for _ in range(num_samples)]
  expected = generate(params, cfg, rows, max_new_tokens=records[0]["num_tokens"], **settings)
  assert [r["token_ids"] for r in records] == expected.tokens
  for b, r in enumerate(records):
    assert set(r) == RECORD_KEYS
    assert (r["prompt_index"], r["sample_index"]) == divmod(b, num_samples)
    assert r["prompt"] == prompts[b // num_samples]
    assert r["completion"] == tokenizer.decode(r["token_ids"])
    assert r["num_tokens"] == len(r["token_ids"]) and r["tokens_per_sec"] > 0


# ---------------------------------------------------------------------------------------------
# End to end


def test_help(capsys):
  status, out, _ = _sample(capsys, ["--help"])
  assert status == 0
  for text in ("--workdir", "--init_from", "gpt2-xl", "--prompt_file", "FILE:path", "---",
               "--num_samples", "--top_p", "--stream", "--json", "--dtype", "Examples:"):
    assert text in out, text


def test_workdir_json_and_text_match_generate(workdir, prompt_file, capsys):
  """Seeded sampling."""
  args = ["--workdir", str(workdir), "--prompt_file", str(prompt_file), "--num_samples", "2",
          "--max_new_tokens", "12", "--temperature", "1.0", "--top_k", "20", "--seed", "3"]
  records = _records(_sample(capsys, args + ["--json"]))
  cfg, params, saved, _ = load_for_inference(workdir)
  tokenizer = tokenizer_from_dict(saved)
  assert tokenizer.name == "char"
  _check_against_generate(records, params, cfg, tokenizer, ["ROMEO:", "JULIET:\nO"], 2,
                          temperature=1.0, top_k=20, seed=3)
  assert {r["stop_reason"] for r in records} == {"max_new_tokens"}
  status, stdout, stderr = _sample(capsys, args)
  assert status == 0, stderr
  assert stdout == "".join(format_sample(r["prompt"], r["completion"]) for r in records)
  assert "compilation included" in stderr


def test_hugging_face_greedy_json_matches_generate(gpt2, tmp_path, capsys):
  (tmp_path / "p.txt").write_text(HF_PROMPTS[1])
  records = _records(_sample(capsys, ["--init_from", str(HF_DIR), "--prompt", HF_PROMPTS[0],
                                      "--prompt", f"FILE:{tmp_path / 'p.txt'}",
                                      "--max_new_tokens", "10", "--temperature", "0", "--json",
                                      "--quiet"]))
  cfg, params = load_hf_gpt2(HF_DIR)
  # GPT-2 BPE; <|endoftext|> (50256) is outside this model's vocabulary, so nothing stops.
  _check_against_generate(records, params, cfg, gpt2, HF_PROMPTS, 1, temperature=0.0)


def test_stream_prints_the_same_text(capsys):
  args = ["--init_from", str(HF_DIR), "--prompt", HF_PROMPTS[0], "--prompt", HF_PROMPTS[1],
          "--num_samples", "2", "--max_new_tokens", "20", "--temperature", "1.0", "--top_k",
          "40", "--top_p", "0.95", "--seed", "7", "--dtype", "bfloat16", "--quiet"]
  plain, stream = _sample(capsys, args), _sample(capsys, args + ["--stream"])
  assert plain[0] == 0 and stream[0] == 0, (plain[2], stream[2])
  assert stream[1] == plain[1]
  samples = plain[1].split(f"\n{sample_cli.SAMPLE_SEPARATOR}\n")
  assert len(samples) == 5 and samples[-1] == ""  # 2 prompts x 2 samples
  assert samples[0].startswith(HF_PROMPTS[0]) and samples[3].startswith(HF_PROMPTS[1])
  assert samples[0] != samples[1]  # different rows draw different tokens


# ---------------------------------------------------------------------------------------------
# Mistakes: one `error:` line naming the bad value, exit status 2


BAD_INPUTS = {
    "top_p-zero": (["--top_p", "0"], "--top_p must be in (0, 1]"),
    "top_p-above-one": (["--top_p", "1.5"], "got 1.5"),
    "negative-top_k": (["--top_k", "-3"], "--top_k must be >= 0 (0 means off), got -3"),
    "negative-temperature": (["--temperature", "-0.5"], "--temperature must be"),
    "zero-max_new_tokens": (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    "zero-num_samples": (["--num_samples", "0"], "--num_samples must be at least 1, got 0"),
    "empty-prompt": (["--prompt", ""], "The prompt '' is empty"),
    "too-long": (["--prompt", "R" * 65], "(65 tokens) is longer than the model's block_size "
                                          "(64)"),
    "window_shift": (["--window_shift", "65"], "--window_shift must be an integer in [1, "
                                               "block_size = 64], got 65"),
    "unknown-char": (["--prompt", "caf\u00e9"], "Character '\u00e9' is not in the character"),
    "step": (["--step", "5"], "No checkpoint of step 5"),
    "both-sources": (["--init_from", "gpt2"], "--init_from is not allowed with --workdir"),
    "stream-and-json": (["--stream", "--json"], "--stream is not allowed with --json"),
    "bad-dtype": (["--dtype", "float64"], "--dtype must be one of float32, bfloat16, got "
                                          "'float64'"),
    "not-a-number": (["--num_samples", "two"], "--num_samples must be an integer, got 'two'"),
}
BAD_SOURCES = {
    "no-source": ([], "Give --workdir"),
    "missing-workdir": (["--workdir", "{tmp}/nowhere"], "nowhere' does not exist"),
    "no-checkpoints": (["--workdir", "{tmp}"], "has no checkpoints/ directory"),
    "unknown-name": (["--init_from", "gpt3"], "Checkpoint directory 'gpt3' does not exist"),
    "missing-prompt-file": (["--init_from", str(HF_DIR), "--prompt_file", "{tmp}/no.txt"],
                            "--prompt_file: file"),
    "prompt-outside-vocab": (["--init_from", str(HF_DIR), "--prompt", "Hello"],
                             "The prompt 'Hello' has token id 15496, outside [0, 96), the "
                             "model's vocabulary"),
}


def _assert_one_sentence(returncode, stdout, stderr, pattern):
  assert returncode == 2, (returncode, stderr)
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr
  assert pattern in lines[0], lines[0]
  assert stdout == ""


@pytest.mark.parametrize("name", list(BAD_INPUTS) + list(BAD_SOURCES))
def test_bad_input_is_one_sentence(name, workdir, gpt2, tmp_path, capsys):
  """launch.sample.main in-process (what the subprocess runs, without a process per case):
  each mistake is caught before any of the sampling programs is compiled (their caches are
  emptied first, so a program an earlier test compiled cannot hide one compiled here)."""
  # pylint: disable-next=protected-access
  programs = (sampling._prefill, sampling._decode, sampling._restart)
  for program in programs:
    program.clear_cache()
  if name in BAD_INPUTS:
    args, pattern = BAD_INPUTS[name]
    args = ["--workdir", str(workdir), *args]
  else:
    args, pattern = BAD_SOURCES[name]
    args = [a.format(tmp=tmp_path) for a in args]
  status = exit_status(sample_cli.main, args)
  out = capsys.readouterr()
  _assert_one_sentence(status, out.out, out.err, pattern)
  # pylint: disable-next=protected-access
  assert [program._cache_size() for program in programs] == [0, 0, 0]


@pytest.mark.parametrize("args, pattern", [
    BAD_INPUTS["top_p-above-one"],
    BAD_INPUTS["unknown-char"],
    # Offline (HF_HUB_OFFLINE=1, an empty HF_HOME): "Could not download 'gpt2-xl' ..." (or,
    # without huggingface_hub installed, "Loading 'gpt2-xl' by name needs huggingface_hub").
    (["--init_from", "gpt2-xl"], "'gpt2-xl'"),
], ids=["top_p-above-one", "unknown-char", "offline-hub-name"])
def test_bad_input_is_one_sentence_in_a_subprocess(args, pattern, env, workdir, gpt2):
  if not args[0].startswith("--init_from"):
    args = ["--workdir", str(workdir), *args]
  out = _run(args, env)
  _assert_one_sentence(out.returncode, out.stdout, out.stderr, pattern)
  assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------
# Helpers (in-process)


def test_prompt_file_and_file_prefix(tmp_path):
  assert sample_cli.split_prompt_file("a\nb\n---\nc\n") == ["a\nb", "c"]
  assert sample_cli.split_prompt_file("one prompt\n") == ["one prompt"]
  assert sample_cli.split_prompt_file("x\n---\n\n---\ny") == ["x", "", "y"]
  (tmp_path / "whole.txt").write_text("kept as is\n---\n")
  (tmp_path / "many.txt").write_text("p1\r\n---\r\np2\n")
  prompts = sample_cli.read_prompts([f"FILE:{tmp_path / 'whole.txt'}", "plain"],
                                    str(tmp_path / "many.txt"))
  assert prompts == ["kept as is\n---\n", "plain", "p1", "p2"]  # universal newlines
  assert sample_cli.read_prompts(None, None) is None


def test_default_prompt_and_stop_token(gpt2):
  char = CharTokenizer("\nab")
  assert sample_cli.default_prompt(gpt2) == "<|endoftext|>"
  assert sample_cli.default_prompt(char) == "\n"
  assert sample_cli.stop_token(gpt2, 50257) == 50256
  assert sample_cli.stop_token(gpt2, 50257, stop=False) is None
  assert sample_cli.stop_token(gpt2, 96) is None  # eot outside the model's vocabulary
  assert sample_cli.stop_token(char, 3) is None


def test_stream_printer_output_equals_text_mode():
  tokenizer = CharTokenizer("\nabcdX")
  eot = tokenizer.encode("X")[0]
  enc = tokenizer.encode
  # Row 1 ends first (eot in chunk 2) while row 0 is still being printed; row 2 never stops.
  chunks = [[enc("ab"), enc("c"), enc("d")], [enc("a"), enc("bX"), enc("")],
            [enc("cX"), [], enc("aa")]]
  out = io.StringIO()
  printer = StreamPrinter(tokenizer, ["p0:", "p1:", "p2:"], eot, out)
  seen = []
  for chunk in chunks:
    printer.push(chunk)
    seen.append(out.getvalue())
  tokens, stopped = printer.finish()
  assert seen[0] == "p0:ab" and seen[1] == "p0:aba"  # row 0 streams; the others wait
  assert stopped == [True, True, False]
  assert [tokenizer.decode(t) for t in tokens] == ["abac", "cb", "daa"]
  assert out.getvalue() == (format_sample("p0:", "abac") + format_sample("p1:", "cb") +
                            format_sample("p2:", "daa"))
