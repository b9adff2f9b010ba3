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
"""

from __future__ import annotations

import os
from typing import Optional

import jax

ENV_COORDINATOR = "JAXINTERP_COORDINATOR"
ENV_NUM_PROCESSES = "JAXINTERP_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXINTERP_PROCESS_ID"


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


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, **kwargs) -> None:
    """Join the processes into one jax runtime (``jax.distributed.initialize``). Call it
    before anything else uses jax. Arguments default to the environment (module
    docstring); ``kwargs`` go to ``jax.distributed.initialize`` (e.g. ``local_device_ids``,
    ``initialization_timeout``)."""
    # CPU devices need a collectives backend to talk across processes (GPUs use NCCL,
    # TPUs their interconnect); gloo ships with jaxlib
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**resolve(coordinator_address, num_processes, process_id), **kwargs)


def is_main_process() -> bool:
    """True on the process that writes results (process 0)."""
    return jax.process_index() == 0


def shutdown() -> None:
    jax.distributed.shutdown()
