"""The zygote: a fresh, single-threaded interpreter that forks the pool's workers.

Why a zygote: a fresh interpreter costs ~100 ms; a fork of the already-initialised,
single-threaded zygote costs a few ms, so a killed worker is replaced almost at once, and
no fork ever happens in your (threaded) program. The zygote imports your ``__main__``
the way ``multiprocessing``'s spawn does, so functions defined there can be sent.

It is a child subreaper: what is left of a stopped worker's tree is re-parented here,
and the parent's *sweep* request (after every worker's death) reaps the worker, then
kills and reaps every child that is not a live worker. It exits, killing every worker
tree first, when its channel to the parent reaches end-of-file (the kernel delivers that
even if the parent is SIGKILLed) and on SIGTERM, SIGHUP and SIGQUIT.

:func:`start` runs in the parent; everything else runs in the zygote.
"""

from __future__ import annotations

import contextlib
import multiprocessing.spawn
import os
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from .. import _cell
from .._platform import (
    ENVIRONMENT_VARIABLE,
    FLAVOUR,
    HAVE_PIDFD,
    children,
    kill_remains,
    kill_tree,
    preload_tree_functions,
    prepare_parent_death_signals,
    set_child_subreaper,
)
from . import _lazy_package
from ._protocol import (
    Exited,
    PrepareFailed,
    Setup,
    Spawn,
    Spawned,
    Sweep,
    SweepStrays,
    Swept,
    ZygoteMessage,
    ZygoteReady,
    recv_record,
    send_record,
)
from ._worker import kill_and_reap_tree, watch_limits, worker_main

__all__ = ("importing_main", "start", "zygote_main")

#: True while a zygote imports the program's ``__main__``: a pool made then would be made
#: by the zygote itself (a script without an ``if __name__ == "__main__":`` guard).
importing_main = False


#: Packages whose ``__init__`` the zygote does not run: their names are imported one by
#: one as they are asked for (:mod:`._lazy_package` says why).
_LAZY_PACKAGES = ("cancelflow", "cancelflow._process")

#: The zygote's program (``python -c``). The zygote runs this process's implementation of
#: the platform layer (their messages depend on it), whatever its environment says; the
#: variable is put back as it was for the tasks.
_START = """\
import importlib.util, os, sys
sys.path.append({root!r})
try:
    spec = importlib.util.spec_from_file_location({lazy_name!r}, {lazy_file!r})
    lazy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lazy)
    lazy.install({packages!r}, {packages[0]!r})
    sys.modules[spec.name] = lazy
except Exception:  # the packages as every process has them, only heavier
    lazy = None
    for name in {packages!r}:
        sys.modules.pop(name, None)
was = os.environ.get({variable!r})
os.environ[{variable!r}] = {flavour!r}
from {module} import zygote_main
if was is None:
    os.environ.pop({variable!r})
else:
    os.environ[{variable!r}] = was
if lazy is not None:
    lazy.serve_loaded()
zygote_main({control}, {chunk})
"""


def start(
    name: str, options: dict[str, Any], chunk_fd: int
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start a zygote (a fresh interpreter) and send it what spawn would send.

    Returns the process and the parent's end of its channel (a stream socket). Leaves
    nothing behind if it raises.
    """
    parent_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # -P: the current directory is not put first on sys.path, so a file there named
    # like a module the zygote imports (selectors.py) is not run; the package's own
    # location goes last, for a cancelflow that is importable only from here.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(_cell.__file__)))
    zygote: subprocess.Popen[bytes] | None = None
    try:
        prep = multiprocessing.spawn.get_preparation_data(name)
        prep["authkey"] = bytes(prep["authkey"])
        prep.pop("start_method", None)
        # The setup travels in a file (its descriptor passed once): initargs may be
        # large, and the zygote reads it before its loop starts.
        with tempfile.TemporaryFile() as setup:
            stdlib = _lazy_package.standard_library_locations()
            pickle.dump((prep, options, stdlib), setup, pickle.HIGHEST_PROTOCOL)
            setup.flush()
            setup.seek(0)
            zygote = subprocess.Popen(
                [
                    multiprocessing.spawn.get_executable() or sys.executable,
                    # the interpreter's flags (-O, -W, -X ...), as spawn passes them
                    *subprocess._args_from_interpreter_flags(),  # type: ignore[attr-defined]
                    "-P",
                    "-c",
                    _START.format(
                        root=package_root,
                        variable=ENVIRONMENT_VARIABLE,
                        flavour=FLAVOUR,
                        lazy_name=_lazy_package.__name__,
                        lazy_file=_lazy_package.__file__,
                        packages=_LAZY_PACKAGES,
                        module=__name__,
                        control=zygote_end.fileno(),
                        chunk=chunk_fd,
                    ),
                ],
                pass_fds=(zygote_end.fileno(), chunk_fd),
                stdin=subprocess.DEVNULL,
            )
            send_record(parent_end, Setup(), [setup.fileno()])
    except BaseException:
        parent_end.close()
        if zygote is not None:
            zygote.kill()
            zygote.wait()
        raise
    finally:
        zygote_end.close()
    return zygote, parent_end


def zygote_main(control_fd: int, chunk_fd: int) -> None:
    """Entry point of the zygote process (started by the pool with two inherited fds)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctrl = socket.socket(fileno=control_fd)
    chunk = _cell.attach_chunk(chunk_fd, pinned=True)
    set_child_subreaper(True)
    prepare_parent_death_signals()
    preload_tree_functions()  # once here, not in each worker's first kill
    try:
        message, fds = recv_record(ctrl)
    except (OSError, ValueError):
        message, fds = None, []
    if not isinstance(message, Setup) or not fds:
        os._exit(0)
    with os.fdopen(fds[0], "rb") as setup_file:  # a file: the setup may be large
        prep, options, stdlib = pickle.load(setup_file)
    _lazy_package.pin_standard_library(stdlib)  # before the program's sys.path is in
    # Before the program's __main__ is imported: a module that binds the name
    # (``from resource import setrlimit``) binds the watched function.
    watch_limits()
    global importing_main
    importing_main = True
    try:
        import multiprocessing.spawn

        multiprocessing.spawn.prepare(prep)
    except BaseException as exc:  # noqa: BLE001 - tasks from __main__ will fail, others work
        _send_or_exit(ctrl, PrepareFailed(repr(exc)))
    finally:
        importing_main = False
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # A termination signal (a whole process group's SIGTERM, a hang-up) ends the zygote
    # the way the parent's end-of-file does: every worker tree is killed first.
    stopping: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, lambda signum, _: stopping.append(signum))
    workers: set[int] = set()
    statuses: dict[int, int] = {}  # reaped workers whose sweep was not asked for yet
    unreported: list[int] = []  # reaped workers the parent was not told of (no pidfd)
    selector = selectors.DefaultSelector()
    selector.register(ctrl, selectors.EVENT_READ, "ctrl")
    selector.register(wake_r, selectors.EVENT_READ, "wake")
    _send_or_exit(ctrl, ZygoteReady(os.getpid()))
    zygote_pid = os.getpid()
    running = True
    while running and not stopping:
        for key, _ in selector.select():
            if key.data == "wake":
                with contextlib.suppress(OSError):
                    os.read(wake_r, 4096)
            else:
                try:
                    message, fds = recv_record(ctrl)
                except (OSError, ValueError):
                    message, fds = None, []
                if message is None:
                    running = False
                    break
                if isinstance(message, Spawn):
                    index, token_offset, control_offset = message
                    pid = os.fork()
                    if pid == 0:
                        selector.close()
                        ctrl.close()
                        os.close(wake_r)
                        os.close(wake_w)
                        worker_main(
                            fds[0], chunk, token_offset, control_offset, zygote_pid, options
                        )
                    os.close(fds[0])
                    workers.add(pid)
                    try:
                        send_record(ctrl, Spawned(index, pid))
                    except OSError:
                        running = False
                        break
                elif isinstance(message, SweepStrays):
                    _kill_strays(workers, time.monotonic() + 1.0)
                elif isinstance(message, Sweep):
                    pid = message.pid
                    status, swept = _sweep(pid, workers, statuses, unreported)
                    try:
                        send_record(ctrl, Swept(pid, status, swept))
                    except OSError:
                        running = False
                        break
        # Reap everything that ended: workers (status kept for their sweep) and strays.
        # Every worker reaped, here or during a sweep above (a second worker can exit
        # while the first is swept): where the parent cannot watch them itself, tell it.
        _reap(workers, statuses, unreported)
        exited, unreported[:] = list(unreported), []
        if not HAVE_PIDFD:
            try:
                for pid in exited:
                    send_record(ctrl, Exited(pid))
            except OSError:
                running = False
    # The parent closed the channel or died: nothing may outlive it, not even what is left
    # of a worker that exited before its sweep was asked for (its group, on "posix").
    for pid in statuses:
        kill_remains(pid)
    kill_and_reap_tree()
    os._exit(0)


def _reap(workers: set[int], statuses: dict[int, int], reaped: list[int]) -> None:
    """Reap every child that ended; keep the exit status of workers for their sweep and
    add each worker reaped to ``reaped``."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in workers:
            workers.discard(pid)
            statuses[pid] = status
            reaped.append(pid)


def _sweep(
    worker: int, workers: set[int], statuses: dict[int, int], reaped: list[int]
) -> tuple[int | None, int]:
    """After ``worker`` died: reap it, then kill and reap every stray process.

    Returns the worker's exit status (``None`` if it could not be had within the bound)
    and how many strays were killed.
    """
    deadline = time.monotonic() + 10.0
    while True:
        _reap(workers, statuses, reaped)
        if worker in workers:  # not exited yet (the parent saw it die, so it is a zombie
            try:  # or about to be one): wait for it
                pid, status = os.waitpid(worker, 0)
            except ChildProcessError:
                workers.discard(worker)
            else:
                workers.discard(pid)
                statuses[pid] = status
            continue
        kill_remains(worker)  # "posix": what is left of its process group (not counted)
        return statuses.pop(worker, None), _kill_strays(workers, deadline)


def _kill_strays(workers: set[int], deadline: float) -> int:
    """Kill (each with its tree, frozen first) and reap every stray, until none is left
    or ``deadline`` passes; return how many processes were killed.

    A stray is any child of the zygote that is not a live worker: what is left of a
    stopped tree (re-parented here when its parent died), or a process a task started as
    its worker's sibling (``clone(CLONE_PARENT)``). Loops, since killing a stray
    re-parents its own children here.
    """
    swept = 0
    while time.monotonic() <= deadline:
        strays = [pid for pid in children(os.getpid()) if pid not in workers]
        if not strays:
            break
        for stray in strays:
            with contextlib.suppress(ValueError):  # refused: never ours to signal
                swept += 1 + len(kill_tree(stray, include_root=True))
        for stray in strays:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(stray, 0)
    return swept


def _send_or_exit(ctrl: socket.socket, message: ZygoteMessage) -> None:
    """Send to the parent from a zygote with no worker yet; if the parent has already
    gone (a pool shut down while its zygote was starting), exit quietly."""
    try:
        send_record(ctrl, message)
    except OSError:
        os._exit(0)
