"""Run ``bayeslora train`` and interrupt it at a known point: right after its first checkpoint.

``python tests/interrupt_worker.py ARGS...`` runs ``bayeslora.cli.main(ARGS)`` in this process with
``BayesLoRATrainer._save`` wrapped so that, once the first checkpoint is completely written, the
process sends itself SIGINT — what Ctrl-C does — instead of racing a timer in the parent against the
training loop. Python raises the ``KeyboardInterrupt`` in the main thread before the next bytecode
of the wrapper returns, so the interrupt lands at the same step on every run, however loaded the
machine is, or whatever SIGINT disposition the parent passed down. Exits with the CLI's exit code.
"""

from __future__ import annotations

import os
import signal
import sys

from bayeslora import cli
from bayeslora.train.trainer import BayesLoRATrainer

_original_save = BayesLoRATrainer._save


def _save_then_interrupt(self, *args, **kwargs):
    _original_save(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    # A process started in the background by a shell without job control (nohup …&, many CI
    # runners) inherits SIGINT *ignored*, and Python then keeps ignoring it: the signal below would
    # be lost and the run would finish. Ctrl-C in a terminal reaches Python's default handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    BayesLoRATrainer._save = _save_then_interrupt  # type: ignore[method-assign]
    sys.exit(cli.main(sys.argv[1:]))
