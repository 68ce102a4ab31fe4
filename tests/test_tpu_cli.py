"""python -m launch.tpu: the program prints the commands of training/tpu/gcloud.py with
--dry_run and the slice's chips and hosts from the table launch.aot uses, and reports mistakes
in one sentence."""

import shlex

import pytest

from conftest import REPO, TRAIN_OVERRIDES, exit_status, remote_script, run_module, subprocess_env
from launch import aot as aot_cli
from launch import tpu as cli
from training.tpu.slices import parse_slice

# Every size the table accepts for each generation (v4/v5p: TensorCores, up to 4 cubes).
SLICE_NAMES = ([f"{g}-{n}" for g in ("v4", "v5p") for n in (8, 16, 32, 64, 128, 256, 384, 512)]
               + [f"{g}-{n}" for g in ("v5e", "v5litepod", "v6e")
                  for n in (1, 4, 8, 16, 32, 64, 128, 256)]
               + ["v5p:4x4x12", "v5litepod:4x8"])


def test_module_dry_run_prints_the_create_command():
  result = run_module("launch.tpu", "create", "--name=my-tpu", "--zone=us-central2-b",
                      "--accelerator_type=v4-32", "--spot", "--dry_run", env=subprocess_env(),
                      timeout=60)
  assert result.returncode == 0, result.stderr
  assert result.stdout == (
      "gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b --accelerator-type=v4-32 "
      "--version=tpu-ubuntu2204-base --spot\n")
  assert result.stderr == "v4-32: 16 chips (TPU v4, 2x2x4) on 4 hosts\n"


@pytest.mark.parametrize("name", SLICE_NAMES)
def test_dry_run_plans_the_chips_and_hosts_of_the_slice_table(name, capsys):
  """launch.aot compiles for parse_slice(--topology); launch.tpu plans parse_slice too."""
  assert exit_status(cli.main, ["create", "--name=n", "--zone=z", f"--accelerator_type={name}",
                                "--dry_run"]) == 0
  out, err = capsys.readouterr()
  tpu = parse_slice(name)
  assert err == (f"{name}: {tpu.chips} chips (TPU {tpu.generation.name}, "
                 f"{'x'.join(map(str, tpu.grid))}) on {tpu.hosts} host"
                 f"{'' if tpu.hosts == 1 else 's'}\n")
  assert f"--accelerator-type={tpu.accelerator_type} " in out


def test_v5p_24_is_refused_alike_by_launch_tpu_and_launch_aot(capsys):
  """The slice table has no v5p-24 (12 chips is no v5p slice); both entry points say so."""
  assert exit_status(cli.main, ["create", "--name=n", "--zone=z", "--accelerator_type=v5p-24",
                                "--dry_run"]) == 2
  tpu_err = capsys.readouterr().err
  assert exit_status(aot_cli.main, ["--config", str(REPO / "configs" / "gpt2.py"),
                                    "--topology", "v5p-24"]) == 2
  aot_err = capsys.readouterr().err
  sentence = ("'v5p-24' is not a v5p slice size: v5p-N counts TensorCores, 8, 16, 32, 64 or a "
              "multiple of 128 (v5p-128, v5p-256, ...).\n")
  assert tpu_err == "error: --accelerator_type " + sentence
  assert aot_err == "error: --topology " + sentence


def test_setup_cli_defaults_to_this_checkout(capsys):
  assert cli.main(["setup", "--name=my-tpu", "--zone=us-central2-b", "--dry_run"]) == 0
  tar = shlex.split(capsys.readouterr().out.splitlines()[0])
  assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", str(REPO), "."]


def test_train_cli_passes_config_overrides(capsys):
  argv = ["train", "--name=my-tpu", "--zone=us-central2-b", "--config=configs/gpt2.py",
          "--workdir=gs://b/r", "--dry_run", *TRAIN_OVERRIDES]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out.splitlines()
  remote = shlex.split(remote_script(shlex.split(out[0])))
  assert remote[remote.index("gs://b/r") + 1:][:len(TRAIN_OVERRIDES)] == TRAIN_OVERRIDES


@pytest.mark.parametrize("argv,message", [
    (["create", "--zone=z", "--accelerator_type=v5p-8"], "--name is required"),
    (["create", "--name=n", "--accelerator_type=v5p-8"], "--zone is required"),
    (["create", "--name=n", "--zone=z"], "--accelerator_type is required"),
    (["create", "--name=n", "--zone=z", "--accelerator_type=v9-8"], "Unknown --accelerator_type"),
    (["status", "--name=n", "--zone=z", "--config.x=1"], "Unknown argument '--config.x=1'"),
    (["status", "--name=n", "--zone=z", "--spot"], "status does not take --spot"),
    (["train", "--name=n", "--zone=z", "--config=c.py", "--workdir=gs://b", "--wat"],
     "Unknown flag --wat"),
    (["train", "--name=n", "--zone=z", "--config=c.py", "--workdir=/tmp/w",
      "--accelerator_type=v4-32"], "v4-32 has 4 hosts"),
    (["create", "--name=n", "--zone=z", "--accelerator_type=v5p-8", "--spot=yes"],
     "--spot must be true or false, got 'yes'"),
    ([], "Give a subcommand: create, setup, train"),
    (["launch", "--name=n", "--zone=z"], "Unknown subcommand 'launch'"),
])
def test_cli_errors_are_one_sentence_with_status_2(capsys, argv, message):
  assert exit_status(cli.main, argv + ["--dry_run"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.startswith("error: ") and message in captured.err
  assert captured.err.count("\n") == 1


def test_missing_gcloud_is_one_sentence(capsys, monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))
  assert exit_status(cli.main, ["status", "--name=n", "--zone=z"]) == 2
  assert "gcloud is not on PATH" in capsys.readouterr().err
