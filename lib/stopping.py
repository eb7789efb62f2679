"""Stopping a script cleanly on SIGINT (Ctrl-C) or SIGTERM (`kill`, a job scheduler, `accelerate launch` passing
on a stop): inside `stop_signals_raise()` the first such signal raises Stopped in the main thread, which unwinds the
stack as Ctrl-C does (game processes closed by their `with` blocks on the way) up to the script's top level, which
keeps what is finished, says how to go on and exits with `Stopped.exit_code`. Later signals are ignored while the
script winds down (SIGKILL still ends it at once). `stop_signals_held()` keeps a signal from cutting a block that
writes something whole (a checkpoint, a report): the signal takes effect when the block ends.
"""

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. A KeyboardInterrupt, so that code which cleans up after Ctrl-C does so after
    SIGTERM too, and `except Exception` lets it through."""

    def __init__(self, signal_number: int):
        self.signal_name = signal.Signals(signal_number).name
        self.exit_code = 128 + signal_number  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        self.finished = None  # what the interrupted work had finished, for the top level to keep (see lib.evaluation)
        super().__init__(self.signal_name)


def _raise_stopped(signal_number: int, frame) -> None:
    for number in STOP_SIGNALS:  # one stop is enough: the unwinding that follows must not be cut in turn
        signal.signal(number, signal.SIG_IGN)
    raise Stopped(signal_number)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only the main thread may set signal handlers


@contextlib.contextmanager
def stop_signals_raise():
    """Inside: SIGINT and SIGTERM raise Stopped; the previous handlers come back on leaving."""
    if not _in_main_thread():
        yield
        return
    previous = {number: signal.signal(number, _raise_stopped) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def stop_signals_held():
    """Inside: a stop signal waits for the block to end, then goes to the handler in place before it."""
    if not _in_main_thread():
        yield
        return
    held = []
    previous = {number: signal.signal(number, lambda number, frame: held.append(number)) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if held:
            signal.raise_signal(held[0])
