"""Interrupts that end a command cleanly.

SIGTERM (what ``kill`` and job schedulers send) raises :class:`Interrupted` in the main thread,
as Ctrl-C raises ``KeyboardInterrupt``; it subclasses ``KeyboardInterrupt`` so that no
``except Exception`` swallows it. Commands catch both, mark their MLflow run KILLED, keep what
finished (stage checkpoints, evaluation rows) and exit with 128 + the signal number, so that
``--resume`` continues from there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator


class Interrupted(KeyboardInterrupt):
    """A termination signal arrived (``signum``: the signal number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise(signum: int, frame) -> None:
    global _last_signal
    _last_signal = signum
    raise Interrupted(signum)


_installed = False
# the signal _raise last turned into Interrupted. A SIGTERM during Ray-task evaluation reached the
# CLI as a plain KeyboardInterrupt (exit 130, no reason): Ray's blocking calls re-raise what the
# handler raised as one, as far as we can tell; the exit status and message stay SIGTERM's here.
_last_signal: int | None = None


def install() -> None:
    """Turn SIGTERM into :class:`Interrupted` (main thread only; a no-op elsewhere)."""
    global _installed
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)
        _installed = True


def reinstall() -> None:
    """Install again after a library replaced the handler (``ray.init`` sets SIGTERM to ``sys.exit``)."""
    if _installed:
        install()


def signal_of(err: KeyboardInterrupt) -> int:
    """The signal behind ``err``: its own, else the one last turned into ``Interrupted`` (a
    library may re-raise it as a plain ``KeyboardInterrupt``), else SIGINT."""
    if isinstance(err, Interrupted):
        return err.signum
    return _last_signal if _last_signal is not None else int(signal.SIGINT)


def exit_code(err: KeyboardInterrupt) -> int:
    """128 + the signal number (``signal_of``), as a shell reports a process ended by that signal."""
    return 128 + signal_of(err)


@contextlib.contextmanager
def ctrl_c_through(library: str) -> Iterator[None]:
    """Around a Ray call that installs its own SIGINT handler in the main thread: Ctrl-C (SIGINT)
    ends the block as a ``KeyboardInterrupt``, whatever that handler made of it, and the SIGINT
    handler is what it was before, afterwards. ``library`` names the call in the interrupt.

    - Ray Train's ``fit()``: its handler aborts the Train controller (which stops the worker group:
      kept, it is the clean way down), then calls ``sys.exit(0)`` inside Ray's blocking get, which
      Ray turns into ``SystemExit(1)`` (``DataParallelTrainer._register_sigint_handler``, Ray 2.60).
      Unhandled, a Ctrl-C in stage 1 or 2 ended the command with exit status 1, no message and its
      MLflow run left RUNNING.
    - Ray Tune's ``Tuner.fit()``: its handler ends the sweep after saving the experiment state, and
      ``fit()`` returns as if the sweep were done (``tune.tune._setup_signal_catching``): the
      command ranked the unfinished trials and wrote a "best" config from them.
    Neither puts the previous handler back when it ends without a SIGINT.

    Whether SIGINT arrived is read from a wakeup fd (``signal.set_wakeup_fd``: the C-level signal
    handler writes each signal's number to it, whatever Python handler is installed), so that a
    ``SystemExit`` for another reason (the raylet died) passes through unchanged.

    Raises:
        KeyboardInterrupt: when SIGINT arrived during the block (the block's ``SystemExit``, if
            any, replaced).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    earlier_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        try:
            yield
        except SystemExit:
            if signal.SIGINT not in _signals_written(read_fd):
                raise
        else:
            if signal.SIGINT not in _signals_written(read_fd):
                return
        raise KeyboardInterrupt(f"SIGINT: {library} stopped") from None
    finally:
        signal.set_wakeup_fd(earlier_fd)
        signal.signal(signal.SIGINT, previous)
        os.close(read_fd)
        os.close(write_fd)


def _signals_written(fd: int) -> set[int]:
    """The signal numbers a wakeup fd (``signal.set_wakeup_fd``) has received, read without blocking."""
    seen: set[int] = set()
    while True:
        try:
            chunk = os.read(fd, 512)
        except BlockingIOError:
            return seen
        if not chunk:
            return seen
        seen.update(chunk)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while a few records are written together (a row and its
    MLflow run), then raise the interrupt that arrived, so that the records never disagree."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if arrived:
        raise Interrupted(arrived[0]) if arrived[0] != signal.SIGINT else KeyboardInterrupt()
