"""Holding Ctrl-C (and SIGTERM) while a block runs that must finish or be undone as a whole."""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def interrupts_held() -> Iterator[list[int]]:
    """Hold Ctrl-C until the block is done; SIGTERM too where it has been made to raise
    KeyboardInterrupt (the CLI does).

    Yields the list of signals caught meanwhile: the caller acts on them after
    the block (a stream stops after its update's bookkeeping; a Dask cluster
    that was starting is closed). Outside the main thread, where signals
    cannot be handled, nothing is held.
    """
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    signums = [signal.SIGINT]
    if signal.getsignal(signal.SIGTERM) is signal.default_int_handler:
        signums.append(signal.SIGTERM)
    old = {n: signal.signal(n, lambda signum, frame: caught.append(signum)) for n in signums}
    try:
        yield caught
    finally:
        for n, handler in old.items():
            signal.signal(n, handler)
