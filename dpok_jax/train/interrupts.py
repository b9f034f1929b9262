"""SIGINT (Ctrl-C) and SIGTERM (what SLURM and preemptible TPU VMs send) end a run cleanly.

One `StopRequest` is installed for a whole `dpok train`. The first signal only sets a flag; every
phase polls it at a point where it can save (after an SFT or DPO step: a checkpoint, then a clean
exit; during a one-pass phase such as the reference pass: a clean exit, the pass is redone on
resume). A second Ctrl-C aborts at once. On many processes the flag is agreed on by all of them at each
poll (a signal may reach the hosts of a pod at different steps), so every process stops after the
same step and their collectives stay matched.
"""

from __future__ import annotations

import signal

import jax
import numpy as np

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(Exception):
    """Raised by a phase that stopped on a signal with nothing more to save."""

    def __init__(self, signum: int, where: str):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} during {where}")


class StopRequest:
    """Context manager: installs SIGINT/SIGTERM handlers (main thread only) and restores them."""

    def __init__(self):
        self._signum: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self._signum is not None and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt
        self._signum = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after the current step and saving "
              "(Ctrl-C again to abort without saving).", flush=True)

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask for a stop as a signal would (tests, `should_stop` callbacks)."""
        self._signum = self._signum or signum

    def poll(self) -> int | None:
        """The signal that asked for a stop (agreed over all processes), or None."""
        local = self._signum or 0
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            local = int(np.max(multihost_utils.process_allgather(np.int32(local))))
            if local and self._signum is None:
                self._signum = local
        return local or None

    @property
    def signum(self) -> int | None:
        return self._signum

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: keep the default behaviour
                pass
        return self

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except ValueError:
                pass
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
