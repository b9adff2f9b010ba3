"""Several hosts (processes) as one set of devices: ``jax.distributed`` set-up.

Every process runs the same program. After :func:`initialize`, ``jax.devices()`` lists
every process's devices, :func:`jaxinterp.sharding.make_mesh` builds a mesh over all of
them, and :func:`jaxinterp.attribution.attribute` with that mesh gives every process
the same scores (each loads the model and the data; each keeps only its shards).

Launch (one line per host; process 0's address is the coordinator)::

    JAXINTERP_COORDINATOR=10.0.0.1:1234 JAXINTERP_NUM_PROCESSES=2 JAXINTERP_PROCESS_ID=0 \\
        jaxinterp attribute --distributed --mesh 2x8 --model DIR --data pairs.csv --out graph.json
    JAXINTERP_COORDINATOR=10.0.0.1:1234 JAXINTERP_NUM_PROCESSES=2 JAXINTERP_PROCESS_ID=1 \\
        jaxinterp attribute --distributed --mesh 2x8 --model DIR --data pairs.csv --out graph.json

On clusters that jax detects itself (SLURM, Open MPI, Cloud TPU) the variables can be
left out. On CPUs (e.g. tests with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
fake devices) cross-process collectives go through gloo, which :func:`initialize` selects.

While it waits for the other processes, :func:`initialize` says on stderr what it waits
for (coordinator address, this process's id, the process count). When they have not all
joined within the timeout (``timeout`` argument, ``JAXINTERP_DISTRIBUTED_TIMEOUT`` or the
CLI's ``--distributed-timeout``; default 300 s) it prints why and ends the process with
status 2: jax itself would abort it (SIGABRT) a little later with a C++ stack trace.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Optional

import jax

ENV_COORDINATOR = "JAXINTERP_COORDINATOR"
ENV_NUM_PROCESSES = "JAXINTERP_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXINTERP_PROCESS_ID"
ENV_TIMEOUT = "JAXINTERP_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT = 300.0


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None) -> dict:
    """Arguments, else the ``JAXINTERP_*`` environment variables, checked for consistency.
    Returns the keyword arguments for ``jax.distributed.initialize`` (empty values are
    left out, so that jax's own cluster detection fills them)."""
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if any(v is not None for v in given.values()) and any(v is None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        raise ValueError(f"distributed set-up needs coordinator address, number of processes and process id "
                         f"together; missing {missing} (arguments or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
                         f"{ENV_PROCESS_ID})")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside 0..{num_processes - 1}")
    if coordinator_address is not None and ":" not in coordinator_address:
        raise ValueError(f"coordinator address {coordinator_address!r} needs a port, e.g. 10.0.0.1:1234")
    return {k: v for k, v in given.items() if v is not None}


def resolve_timeout(timeout: Optional[float] = None) -> float:
    """Seconds to wait for the other processes: ``timeout``, else ``JAXINTERP_DISTRIBUTED_TIMEOUT``,
    else 300."""
    if timeout is None:
        value = os.environ.get(ENV_TIMEOUT)
        if value in (None, ""):
            return DEFAULT_TIMEOUT
        try:
            timeout = float(value)
        except ValueError:
            raise ValueError(f"environment variable {ENV_TIMEOUT}={value!r} is not a number of seconds") from None
    if not timeout > 0 or timeout != timeout or timeout == float("inf"):
        raise ValueError(f"distributed timeout must be a finite number of seconds > 0, got {timeout!r}")
    return float(timeout)


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, timeout: Optional[float] = None, **kwargs) -> None:
    """Join the processes into one jax runtime (``jax.distributed.initialize``). Call it
    before anything else uses jax. Arguments default to the environment (module
    docstring); ``kwargs`` go to ``jax.distributed.initialize`` (e.g. ``local_device_ids``).

    Says on stderr what it waits for; after ``timeout`` seconds (:func:`resolve_timeout`)
    without all processes it prints why and exits the process with status 2 (the wait is
    inside jax's C++ runtime, which cannot be interrupted by an exception)."""
    given = resolve(coordinator_address, num_processes, process_id)
    timeout = resolve_timeout(timeout)
    if given:
        what = (f"process {given['process_id']} of {given['num_processes']}: joining coordinator "
                f"{given['coordinator_address']}")
    else:
        what = "joining the processes of the cluster jax detects (SLURM, Open MPI, Cloud TPU)"
    print(f"jaxinterp: distributed: {what}; waiting up to {timeout:g} s for all processes ({ENV_TIMEOUT} or "
          f"--distributed-timeout to change)", file=sys.stderr, flush=True)
    done = threading.Event()

    def watchdog():
        if not done.wait(timeout):
            sys.stderr.write(f"jaxinterp: error: distributed: {what}: not every process joined within {timeout:g} s "
                             f"(is every process started, with the same coordinator address and process count, "
                             f"and is the coordinator reachable?)\n")
            sys.stderr.flush()
            os._exit(2)

    threading.Thread(target=watchdog, name="jaxinterp-distributed-timeout", daemon=True).start()
    # CPU devices need a collectives backend to talk across processes (GPUs use NCCL,
    # TPUs their interconnect); gloo ships with jaxlib
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs.setdefault("initialization_timeout", int(timeout) + 60)  # ours fires first, with a message
    try:
        jax.distributed.initialize(**given, **kwargs)
    finally:
        done.set()


def is_main_process() -> bool:
    """True on the process that writes results (process 0)."""
    return jax.process_index() == 0


def shutdown() -> None:
    jax.distributed.shutdown()
