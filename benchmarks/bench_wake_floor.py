"""The floor of a wake-up across processes: the bare primitives, with no cancelflow code.

A forked child blocks; the parent stores a word and wakes it, and the child stamps the
moment it runs again (``time.monotonic_ns`` is system-wide on Linux). Each primitive is
measured twice: the waker blocks right after its wake-up (what a pipe's writer does in
``bench_platforms``), and it keeps running for 40 µs (what a ``cancel()`` does after its
wake-up: it gives back the slot's lock and runs its own process's callbacks).

- ``pipe``: a byte written to a pipe, the child blocked in ``os.read``;
- ``datagram``: a byte sent on a connected ``AF_UNIX`` datagram socket, the child blocked
  in ``recv`` (the ``posix`` implementation's doorbell);
- ``futex``: a 32-bit word in shared memory set and ``FUTEX_WAKE``d, the child blocked in
  ``FUTEX_WAIT`` (the ``linux`` implementation), only where the futex is available.

Samples are interleaved (pipe, datagram, futex, pipe, ...) with a 2 ms pause before each,
so a noisy moment lands on all; medians and p99 are reported, and each primitive's median
as a ratio of the pipe's. This says what the issue's "a cross-process wake within 2x a
pipe wake-up" leaves for everything a cancel does besides the wake-up itself.

Run: ``python -m benchmarks.bench_wake_floor [samples]``
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import os
import socket
import statistics
import sys
import time
from typing import Any

from cancelflow._platform import HAVE_FUTEX, futex_wait, futex_wake

#: how long the waker keeps running after its wake-up in the "runs on" rows
RUN_ON_NS = 40_000


def _child(
    kinds: list[str], samples: int, report: Any, pipe_r: int, sock: socket.socket, word: Any
) -> None:
    address = ctypes.addressof(word)
    for _ in range(samples * 2):
        for kind in kinds:
            report.send("ready")
            if kind == "pipe":
                os.read(pipe_r, 1)
            elif kind == "datagram":
                sock.recv(1)
            else:
                while word.value == 0:
                    futex_wait(address, 0, 5.0)
            report.send(time.monotonic_ns())
            report.recv()  # reset done


def measure(samples: int) -> dict[str, dict[str, float]]:
    kinds = ["pipe", "datagram"] + (["futex"] if HAVE_FUTEX else [])
    memory = mmap.mmap(-1, mmap.PAGESIZE)
    word = ctypes.c_uint32.from_buffer(memory)
    address = ctypes.addressof(word)
    pipe_r, pipe_w = os.pipe()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    parent_end, child_end = multiprocessing.Pipe()
    process = multiprocessing.get_context("fork").Process(
        target=_child, args=(kinds, samples, child_end, pipe_r, theirs, word)
    )
    process.start()
    out: dict[str, list[float]] = {
        f"{kind}, {mode}": [] for mode in ("waker blocks", "waker runs on") for kind in kinds
    }
    try:
        for i in range(samples * 2):
            mode = "waker blocks" if i % 2 == 0 else "waker runs on"
            for kind in kinds:
                assert parent_end.recv() == "ready"
                time.sleep(0.002)
                start = time.monotonic_ns()
                if kind == "pipe":
                    os.write(pipe_w, b"x")
                elif kind == "datagram":
                    ours.send(b"x")
                else:
                    word.value = 1
                    futex_wake(address)
                if mode == "waker runs on":
                    while time.monotonic_ns() - start < RUN_ON_NS:
                        pass
                woke = parent_end.recv()
                out[f"{kind}, {mode}"].append((woke - start) / 1000)
                word.value = 0
                parent_end.send("reset")
    finally:
        process.join(30)
        for fd in (pipe_r, pipe_w):
            os.close(fd)
        ours.close()
        theirs.close()
        del word
        memory.close()
    result = {}
    for name, values in out.items():
        ordered = sorted(values)
        result[name] = {
            "median": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        }
    return result


def main(argv: list[str]) -> None:
    samples = int(argv[0]) if argv else 200
    result = measure(samples)
    print(f"cross-process wake-up, µs from the wake to the child running ({samples} samples each)")
    for mode in ("waker blocks", "waker runs on"):
        pipe = result[f"pipe, {mode}"]["median"]
        for name, row in result.items():
            if name.endswith(mode):
                print(
                    f"  {name:26} p50 {row['median']:7.1f}  p99 {row['p99']:7.1f}  "
                    f"{row['median'] / pipe:5.2f}x the pipe"
                )


if __name__ == "__main__":
    main(sys.argv[1:])
