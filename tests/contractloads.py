"""Task functions for the executor-contract tests (importable by pool workers)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import cancelflow
import workloads

_initialized: list[Any] = []


def square(x: int) -> int:
    return x * x


def whoami() -> int:
    return os.getpid()


def remember(*args: Any) -> None:
    """An initializer: keeps its arguments for :func:`initialized`."""
    _initialized.append(args)


def initialized() -> list[Any]:
    return list(_initialized)


def fail_to_initialize() -> None:
    raise RuntimeError("initializer says no")


def raise_with_a_line() -> None:
    raise ValueError("raised on purpose")  # the remote traceback shows this line


class TwoArgumentError(Exception):
    """Pickles, but cannot be unpickled: ``__init__`` takes two arguments, ``args`` has one."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def raise_unpicklable_error() -> None:
    raise TwoArgumentError("first", "second")


def _explode_outside(pid: int) -> Any:
    if os.getpid() != pid:
        raise RuntimeError("this value can only be rebuilt in its worker")
    return "rebuilt"


class WorkerOnly:
    """Pickles anywhere; unpickles only in the process that made it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode_outside, (os.getpid(),))


def return_worker_only() -> WorkerOnly:
    return WorkerOnly()


def store_worker_only_then_spin() -> None:
    cancelflow.store_partial("ok", 1)
    cancelflow.store_partial("bad", WorkerOnly())
    token = cancelflow.current_token()
    while not token.is_cancelled:
        time.sleep(0.001)


class UnpicklableHere:
    def __reduce__(self) -> Any:
        raise TypeError("refuses to pickle")


def return_unpicklable() -> UnpicklableHere:
    return UnpicklableHere()


def wait_until_cancelled() -> str:
    cancelflow.store_partial("pid", os.getpid())
    token = cancelflow.current_token()
    while not token.is_cancelled:
        time.sleep(0.001)
    return token.cancel_reason or ""


def raise_once_cancelled() -> None:
    """Raise an ordinary exception (never ``CancelledException``) once asked to stop."""
    cancelflow.store_partial("pid", os.getpid())
    token = cancelflow.current_token()
    while not token.is_cancelled:
        time.sleep(0.001)
    raise ValueError("late")


def set_sigterm(disposition: str) -> int:
    """Change this worker's SIGTERM disposition and return (a later task sees the effect)."""
    signal.signal(signal.SIGTERM, getattr(signal, disposition))
    return os.getpid()


def set_sigterm_then_spin(disposition: str) -> None:
    signal.signal(signal.SIGTERM, getattr(signal, disposition))
    workloads.announce_and_finish_in_finally()


def sigterm_disposition() -> str:
    handler = signal.getsignal(signal.SIGTERM)
    return getattr(handler, "__name__", repr(handler))


def change_cwd_and_env(path: str) -> None:
    os.chdir(path)
    os.environ["CANCELFLOW_TEST_LEFTOVER"] = "1"


def cwd_and_env() -> tuple[str, str | None]:
    return os.getcwd(), os.environ.get("CANCELFLOW_TEST_LEFTOVER")


def leave_a_thread() -> int:
    threading.Thread(target=time.sleep, args=(3600,), daemon=True, name="leftover").start()
    return os.getpid()


def echo_argv0() -> str:
    return sys.argv[0]


def fork_and_return_in_both() -> tuple[str, int]:
    """Fork; the child returns out of the task too (it must not answer for it)."""
    if os.fork() == 0:
        return ("child", os.getpid())
    os.wait()
    return ("parent", os.getpid())


def debug_flag() -> bool:
    return __debug__


def size_of(data: bytes) -> int:
    return len(data)


class Big:
    """A result big enough to notice if something keeps it alive."""

    def __init__(self) -> None:
        self.data = bytes(1 << 20)


def start_fork_chain(path: str) -> None:
    """Start a chain of processes that each fork a successor and exit at once (the
    double-fork pattern on repeat: a moving target for a tree walk); every link records
    its pid in ``path``. The chain ends by itself after 20 seconds."""
    cancelflow.store_partial("pid", os.getpid())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    deadline = time.monotonic() + 20
    if os.fork() == 0:
        try:
            while time.monotonic() < deadline:
                os.write(fd, f"{os.getpid()}\n".encode())
                if os.fork() != 0:
                    break  # the parent leaves; its child goes on
        finally:
            os._exit(0)
    cancelflow.store_partial("chain", True)
    while True:
        time.sleep(1)


def leave_an_orphan() -> int:
    """Start a process whose parent exits at once (a double fork: the orphan leaves the
    worker's tree) and return its pid. The orphan ignores SIGTERM and sleeps."""
    read, write = os.pipe()
    middle = os.fork()
    if middle == 0:
        orphan = os.fork()
        if orphan == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(1)
        os.write(write, str(orphan).encode())
        os._exit(0)
    os.waitpid(middle, 0)
    os.close(write)
    pid = int(os.read(read, 32))
    os.close(read)
    return pid


def orphan_then_wait_until_cancelled() -> None:
    """Leave an orphan (its pid stored as the partial result "orphan"), then poll the
    token until it is cancelled, and return."""
    cancelflow.store_partial("orphan", leave_an_orphan())
    while not cancelflow.current_token().is_cancelled:
        time.sleep(0.01)


def exit_at(deadline: float) -> None:
    """Sleep until ``deadline`` (``time.monotonic()``, the same clock in every process of
    the machine), then end the worker at once with exit code 3."""
    time.sleep(max(0.0, deadline - time.monotonic()))
    os._exit(3)


def _exit_while_unpickled() -> None:
    sys.exit(3)


class ExitsWhenUnpickled:
    """Pickles anywhere; unpickling it (in the worker) raises SystemExit."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _exit_while_unpickled, ()


def pause_after_its_result() -> int:
    """Runs in a worker: once the worker has sent this task's result it sleeps, as if the
    kernel left it off the CPU right then, instead of going back to wait for work."""
    from cancelflow._process import _protocol, _worker

    send = _worker._Worker.send

    def send_then_pause(self: Any, message: Any) -> None:
        send(self, message)
        if type(message) is _protocol.Result:
            time.sleep(60)

    _worker._Worker.send = send_then_pause  # type: ignore[method-assign]
    return os.getpid()


class _SlowToPickle:
    """A result whose pickling takes a minute (it writes its pid to the FIFO at ``path``
    as it starts)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        with open(self.path, "w") as file:
            file.write(str(os.getpid()))
        time.sleep(60)
        return (str, ("pickled",))


def slow_to_pickle(path: str) -> _SlowToPickle:
    """A task whose result takes a minute to pickle in the worker."""
    return _SlowToPickle(path)
