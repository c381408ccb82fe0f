"""Multi-host start-up: call `jax.distributed.initialize()` when the launcher says there are several processes.

Detected launchers: an explicit coordinator (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID),
SLURM (SLURM_NTASKS > 1), Open MPI (OMPI_COMM_WORLD_SIZE > 1) and TPU pod slices (several
TPU_WORKER_HOSTNAMES); for the last three jax finds the coordinator and process ids itself.
M1JAX_DISTRIBUTED=1 forces the call (e.g. on TPU VMs that do not set TPU_WORKER_HOSTNAMES).
"""

from __future__ import annotations

import os

import jax


def launched_multi_process(env=os.environ) -> bool:
    def more_than_one(name: str) -> bool:
        return int(env.get(name, "1") or "1") > 1

    return (env.get("M1JAX_DISTRIBUTED") == "1" or bool(env.get("JAX_COORDINATOR_ADDRESS"))
            or more_than_one("SLURM_NTASKS")
            or more_than_one("OMPI_COMM_WORLD_SIZE") or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1)


def maybe_initialize_distributed() -> None:
    """Join the other processes of a multi-host launch (once); a no-op on a single host."""
    if launched_multi_process() and not jax.distributed.is_initialized():
        kwargs = {}
        if os.environ.get("JAX_COORDINATOR_ADDRESS"):
            missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not os.environ.get(v)]
            if missing:
                raise RuntimeError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not: set all three on every host")
            kwargs = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
                      "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
                      "process_id": int(os.environ["JAX_PROCESS_ID"])}
        jax.distributed.initialize(**kwargs)
