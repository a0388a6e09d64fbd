"""One fresh process per measured configuration, driven step by step from the parent.

Each configuration (a model at a mask ratio, say) lives in a process of its own, so its peak memory is its own and
no allocator state carries over from another. The parent asks each process for one step in turn, so the load of a
shared machine falls on all compared configurations alike (`statistics.paired_ratios`).

A measurement provides ``build(spec) -> (step, device, num_parameters)``, a module-level function (processes are
spawned) that builds the configuration `spec` describes and returns a no-argument callable taking one training step.
"""

from __future__ import annotations

import ctypes
import resource
import sys
import time
import traceback
from collections.abc import Callable

import torch

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def glibc() -> ctypes.CDLL | None:
    """The C library the interpreter runs on, if it is glibc."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process: serve large blocks from the heap instead of fresh ``mmap``s and
    never trim the heap. Returns whether it applied (False where the C library is not glibc).

    Why: under glibc's defaults a freed block above the mmap threshold, or a heap top above the trim threshold, goes
    back to the system, and the next step's activations page-fault in anew. How often depends on the order and sizes
    of a process's allocations, not on its arithmetic: with processes taking turns, one that sleeps while the others
    step can lose its activations each round, and which one suffers changes from process to process. A training
    process stepping back to back keeps them, which is what this setting reproduces."""
    libc = glibc()
    return libc is not None and libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


def minor_page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def serve(conn, spec: dict, build: Callable) -> None:
    """The child process: build the configuration, then answer ``"warmup"`` (``spec["warmup"]`` untimed steps) with
    the peak memory in bytes, ``"step"`` with ``(seconds, minor page faults)``; `None` ends it.

    On CPU the memory is how far the process's peak RSS grew over its value before the model was built (weights,
    gradients, optimizer and EMA state, activations); a step is timed with ``perf_counter``. On CUDA the memory is
    ``max_memory_allocated`` and a step is timed with CUDA events (the GPU's own clock, between the step's first and
    last kernels). ``spec["allocator"] == "keep"`` applies `keep_freed_memory` first; ``spec["threads"]`` sets
    torch's threads."""
    try:
        if spec.get("allocator") == "keep" and not keep_freed_memory():
            raise RuntimeError("--allocator keep needs glibc's mallopt; use --allocator system on this platform")
        torch.set_num_threads(spec["threads"])
        rss_before = max_rss_bytes()
        step, device, num_parameters = build(spec)
        conn.send({"num_parameters": num_parameters})
        while (command := conn.recv()) is not None:
            if command == "warmup":
                for _ in range(spec["warmup"]):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    conn.send(torch.cuda.max_memory_allocated(device))
                else:
                    conn.send(max_rss_bytes() - rss_before)
            elif device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                conn.send((start.elapsed_time(end) / 1e3, 0))
            else:
                faults = minor_page_faults()
                start = time.perf_counter()
                step()
                conn.send((time.perf_counter() - start, minor_page_faults() - faults))
    except Exception:
        conn.send(RuntimeError(f"benchmark worker for {spec} failed:\n{traceback.format_exc()}"))
    finally:
        conn.close()


class IsolatedProcess:
    """A fresh process serving one configuration (`serve`).

    Args:
        context: a `multiprocessing` context (``get_context("spawn")``: no state inherited from the parent).
        spec (`dict`): the configuration, handed to `build`.
        build (`Callable`): a module-level ``build(spec) -> (step, device, num_parameters)``.
    """

    def __init__(self, context, spec: dict, build: Callable):
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=serve, args=(child_conn, spec, build), daemon=True)
        self.process.start()
        child_conn.close()
        self.num_parameters = self._receive()["num_parameters"]

    def _receive(self):
        reply = self.conn.recv()
        if isinstance(reply, Exception):
            raise reply
        return reply

    def ask(self, command: str):
        """``"warmup"`` -> peak memory in bytes; ``"step"`` -> ``(seconds, page faults)``."""
        self.conn.send(command)
        return self._receive()

    def close(self):
        self.conn.send(None)
        self.process.join()
