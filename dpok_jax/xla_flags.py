"""XLA flags that must be set before JAX starts its backend (imports nothing but `os`).

`--xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA:CPU runs the independent operations
of a step concurrently, each fake device on its own thread. Two collectives with no data dependency
between them (on an fsdp mesh with HMK: the layer loop's all-reduce and an all-gather of the HMK
kernel computation) can then start in a different order on different devices; each collective is a
rendezvous of all devices, so half the devices wait in one and half in the other until XLA aborts
("Termination timeout for all gather ... only 4 of them arrived", rc 134). Reproduced on the
session-3 code with `dpok train --config configs/tiny_cpu.yaml mesh.fsdp=8 sft.steps=0` on 8 fake
CPU devices; with this flag the scheduler keeps one order and the run finishes. The flag only changes
the CPU compiler; GPU and TPU collectives are ordered by their own runtimes.
"""

from __future__ import annotations

import os

CPU_COLLECTIVE_ORDER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def ensure_cpu_collective_order(environ=os.environ) -> None:
    """Add the flag above to `XLA_FLAGS` unless the user set that option themselves. Call it before
    anything initializes a JAX backend (`dpok` does at start-up; tests in the root conftest)."""
    flags = environ.get("XLA_FLAGS", "")
    if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        environ["XLA_FLAGS"] = (flags + " " + CPU_COLLECTIVE_ORDER_FLAG).strip()
