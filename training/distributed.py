"""Starting a multi-process (multi-host) run: jax.distributed.initialize, before any device use.

    initialize(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=0)  # explicit
    initialize()  # auto: a multi-host TPU slice (from its environment), else nothing

Explicit arguments are for GPU clusters and local CPU tests; every process runs the same
command with its own process_id. With no arguments, only a TPU VM that is one of several hosts
(TPU_WORKER_HOSTNAMES / MEGASCALE_* naming more than one) starts the distributed runtime, with
jax's own TPU auto-detection; a plain single machine stays a single process. Multi-process CPU
runs use gloo for the collectives across processes.

    preemption_sync_point(step) -> bool   # all processes agree to stop and save at this step
"""

from __future__ import annotations

import os

from model.errors import UserError

_TPU_HOSTS_ENV = "TPU_WORKER_HOSTNAMES"
_MEGASCALE_ENV = "MEGASCALE_NUM_SLICES"
_initialized = False


def check_args(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None) -> bool:
  """Whether the arguments ask for an explicit multi-process run; raises UserError when only
  some are given or a value is out of range."""
  given = [x is not None for x in (coordinator_address, num_processes, process_id)]
  if not any(given):
    return False
  if not all(given):
    raise UserError("--coordinator_address, --num_processes and --process_id go "
                    "together; give all three or none.")
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit():
    raise UserError(f"--coordinator_address must be host:port, got "
                    f"{coordinator_address!r}.")
  if num_processes < 1:
    raise UserError(f"--num_processes must be positive, got {num_processes}.")
  if not 0 <= process_id < num_processes:
    raise UserError(f"--process_id must be in [0, {num_processes}), got {process_id}.")
  return True


def tpu_hosts(environ=None) -> int:
  """Hosts of the TPU job this machine belongs to according to its environment (1 if none):
  the workers of its slice times the slices of a multi-slice (Megascale) job."""
  environ = os.environ if environ is None else environ
  names = [h for h in environ.get(_TPU_HOSTS_ENV, "").split(",") if h.strip()]
  try:
    slices = int(environ.get(_MEGASCALE_ENV, "1") or 1)
  except ValueError:
    slices = 1
  return max(len(names), 1) * max(slices, 1)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, environ=None) -> bool:
  """Start the distributed runtime when asked explicitly or on a multi-host TPU job; returns
  whether it was started. Call before anything touches a device (jax.devices(), arrays)."""
  global _initialized  # pylint: disable=global-statement
  explicit = check_args(coordinator_address, num_processes, process_id)
  if _initialized or not (explicit or tpu_hosts(environ) > 1):
    return False
  import jax  # pylint: disable=import-outside-toplevel
  if explicit and num_processes == 1:
    return False
  _use_cpu_collectives(jax)
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()  # TPU: coordinator and process id from the TPU metadata
  _initialized = True
  return True


def _use_cpu_collectives(jax) -> None:
  """gloo for cross-process collectives when the run is on CPU (the default in recent jax;
  set explicitly so that a CPU run never silently lacks them)."""
  platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
  if platforms.split(",")[0].strip() == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def preemption_sync_point(step: int) -> bool:
  """True at the one step where every process of a multi-process run should save and stop
  after a preemption notice (SIGTERM) reached any of them; False on a single process or when
  jax's preemption service is off. Call at every step, on every process."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1 or distributed.global_state.preemption_sync_manager is None:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return multihost_utils.reached_preemption_sync_point(step)


def multi_process() -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_count() > 1
