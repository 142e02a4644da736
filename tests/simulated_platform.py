"""Run code in a fresh interpreter that looks like macOS or Windows to cancelflow.

What that platform lacks is removed before cancelflow is imported: modules become
unimportable, functions and constants disappear. ``sys.platform`` is set to ``"darwin"``
for macOS (the standard library copes); for Windows it stays, since the standard library
would then import Windows-only modules, and the missing POSIX pieces alone must lead
cancelflow to its ``"windows"`` implementation. No ``CANCELFLOW_PLATFORM`` is set: the
choice must come from what is there.

Kept on the simulated Windows, because the standard library's own POSIX code for starting
a process needs them (on Windows it has other code): ``os.WNOHANG``,
``signal.pthread_sigmask``, ``_posixsubprocess``. ``socket.socketpair`` becomes the
loopback TCP pair that Windows has.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

#: the standard-library modules imported before anything is hidden (as they would be
#: imported on the real platform, where what they need exists)
_PRELOAD = (
    "asyncio, concurrent.futures, ctypes, ctypes.util, multiprocessing, "
    "multiprocessing.connection, multiprocessing.reduction, multiprocessing.popen_spawn_posix, "
    "multiprocessing.popen_fork, multiprocessing.resource_tracker, selectors, socket, subprocess, "
    "tempfile, threading, loguru, psutil, cloudpickle"
)

_MACOS = """
import os, signal, socket, sys
for name in ("memfd_create", "MFD_CLOEXEC", "pidfd_open", "pipe2", "eventfd",
             "sched_getaffinity", "sched_setaffinity"):
    if hasattr(os, name):
        delattr(os, name)
if hasattr(os, "process_cpu_count"):  # 3.13+: without sched_getaffinity, os makes it
    os.process_cpu_count = os.cpu_count  # an alias of cpu_count (as on macOS, Windows)
for name in ("SOCK_SEQPACKET",):
    if hasattr(socket, name):
        delattr(socket, name)
for name in ("pidfd_send_signal",):
    if hasattr(signal, name):
        delattr(signal, name)
sys.platform = "darwin"
"""

_WINDOWS = """
import os, signal, socket, sys
for module in ("fcntl", "resource", "termios", "pwd", "grp", "_posixshmem"):
    sys.modules[module] = None
for name in ("fork", "register_at_fork", "forkpty", "getpgrp", "getpgid", "killpg",
             "setsid", "setpgrp", "memfd_create", "MFD_CLOEXEC", "pidfd_open", "pipe2",
             "eventfd", "sysconf", "sched_getaffinity", "getuid",
             "geteuid", "mkfifo", "wait3", "wait4", "waitid", "sync"):
    if hasattr(os, name):
        delattr(os, name)
if hasattr(os, "process_cpu_count"):  # 3.13+: without sched_getaffinity, os makes it
    os.process_cpu_count = os.cpu_count  # an alias of cpu_count (as on macOS, Windows)
for name in ("AF_UNIX", "SOCK_SEQPACKET", "SCM_RIGHTS", "CMSG_LEN", "CMSG_SPACE"):
    if hasattr(socket, name):
        delattr(socket, name)

def _loopback_socketpair(family=socket.AF_INET, type=socket.SOCK_STREAM, proto=0):
    # What socket.socketpair is on Windows: a loopback TCP connection.
    with socket.socket(family, type, proto) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client

socket.socketpair = _loopback_socketpair
for name in ("SIGKILL", "SIGSTOP", "SIGCONT", "SIGCHLD", "SIGHUP", "SIGQUIT", "SIGUSR1",
             "SIGUSR2", "SIGALRM", "SIGPIPE", "pthread_kill",
             "pidfd_send_signal", "setitimer", "getitimer", "siginterrupt", "sigwait",
             "sigpending", "alarm", "pause"):
    if hasattr(signal, name):
        delattr(signal, name)
"""

PLATFORMS = {"darwin": _MACOS, "win32": _WINDOWS}


def run(platform: str, code: str, *, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) as a script in a fresh interpreter simulating ``platform``.

    A script, not ``-c``: a process it starts with spawn imports it again as its
    ``__main__``, and so runs on the same simulated platform.
    """
    prelude = f"import {_PRELOAD}\n" + PLATFORMS[platform]
    env = {k: v for k, v in os.environ.items() if k != "CANCELFLOW_PLATFORM"}
    with tempfile.TemporaryDirectory() as directory:
        script = os.path.join(directory, "simulated.py")
        with open(script, "w", encoding="utf-8") as handle:
            handle.write(prelude + textwrap.dedent(code))
        return subprocess.run(
            [sys.executable, script],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
            cwd=directory,
        )
