"""Data parallelism on a multi-core CPU without ``accelerate launch``.

A ~1M-parameter model keeps one core busy and gains little from a second thread (its
matmuls are too small), so on a CPU ``distill generate`` and ``distill train`` start one
single-threaded process per core themselves: the same gloo process group that
``accelerate launch`` would make, set up through the environment variables Accelerate
reads. Both stages already split their work by rank and give the same result for any
number of processes, so this changes only the wall time.

``DISTILL_CPU_PROCS`` sets the number of processes (``auto`` = one per core, at most 8;
``1`` = stay in this process). Nothing is spawned on a GPU host or under a launcher
that already set ``WORLD_SIZE``.

The ranks die with the process that spawned them (``kill -9`` of ``distill run`` included):
a rank left running would finish its stage and write into directories a rerun is
already writing.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from distill.errors import UserError, storage_error

ENV = "DISTILL_CPU_PROCS"
MAX_AUTO = 8  # beyond this, gloo's all-reduce of a small model costs more than it saves


MANY_CORES = 8  # host work (filter domains, tokenizing) spreads over processes from here;
# below it (the 2-core demo and CI machines) it stays in one, where workers would only
# fight the verifier pools and training processes for the cores


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's share), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on every platform
        return os.cpu_count() or 1


def cpu_procs() -> int:
    """Processes a CPU stage should run in (1 = this process)."""
    import torch

    if torch.cuda.is_available() or "WORLD_SIZE" in os.environ:
        return 1
    value = os.environ.get(ENV, "auto").strip().lower()
    if value == "auto":
        return max(1, min(os.cpu_count() or 1, MAX_AUTO))
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"{ENV}: expected 'auto' or a process count, got {value!r}") from None
    if n < 1:
        raise UserError(f"{ENV}: expected at least 1 process, got {n}")
    return n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent(parent: int) -> None:
    """End this process when ``parent`` ends, however it ends: the kernel's parent-death
    signal on Linux, and everywhere a thread that watches the parent id change."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def spawn_pool(workers: int, init: Callable | None = None, initargs: tuple = ()):
    """A process pool whose workers are spawned (a fork of a process holding torch's
    threads and locks can deadlock) and die with this process (left running, they would
    go on writing what a rerun writes); ``init(*initargs)`` then runs in each. The
    initargs travel with the spawn, so multiprocessing events and values may be among
    them."""
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context("spawn"),
        initializer=_pool_init,
        initargs=(os.getpid(), init, initargs),
    )


def _pool_init(parent: int, init: Callable | None, initargs: tuple) -> None:
    die_with_parent(parent)
    if init is not None:
        init(*initargs)


def env_count(name: str) -> int | None:
    """A process count from the environment variable ``name``: None when unset or
    ``auto``; a clear error for anything but a whole number >= 0."""
    value = os.environ.get(name, "auto").strip().lower()
    if value in ("", "auto"):
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise UserError(
            f"{name}: expected 'auto' or a process count (0 or 1 = one process), got {value!r}"
        )
    return n


def _worker(
    fn: Callable, args: tuple, rank: int, world: int, port: int, results, parent: int
) -> None:
    die_with_parent(parent)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    import torch

    # the cores are shared out between the ranks (torch was imported before this ran);
    # with OMP_NUM_THREADS set, accelerate keeps our count and does not warn once per rank
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        out = fn(*args)
        results.put((rank, "ok", out if rank == 0 else None))
    except UserError as e:
        results.put((rank, "user", str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which re-raises
        # a full or read-only disk is the user's to fix; one that names no directory is
        # named by the parent's run_stage, which knows the stage's
        if isinstance(e, Exception) and (disk := storage_error(e, vague=False)) is not None:
            results.put((rank, "user", str(disk)))
            return
        results.put((rank, "crash", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:  # a spawned process runs no atexit handlers: end its group here
        end_process_group()


def end_process_group() -> None:
    """Destroy this process's torch.distributed group, if it has one (at its exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], *args: Any, procs: int, what: str) -> Any:
    """Run ``fn(*args)`` in ``procs`` spawned processes forming one gloo group and return
    rank 0's result. A failing rank stops the others (they would wait forever in the
    next collective); its UserError is raised here unchanged."""
    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    results = ctx.SimpleQueue()
    port = _free_port()
    workers = [
        ctx.Process(
            target=_worker, args=(fn, args, r, procs, port, results, os.getpid()), daemon=False
        )
        for r in range(procs)
    ]
    for w in workers:
        w.start()
    outcome: dict[int, tuple[str, Any]] = {}
    try:
        while len(outcome) < procs:
            if not results.empty():
                rank, status, value = results.get()
                outcome[rank] = (status, value)
                if status != "ok":
                    break
                continue
            dead = [r for r, w in enumerate(workers) if w.exitcode not in (None, 0)]
            dead = [r for r in dead if r not in outcome and results.empty()]
            if dead:
                code = workers[dead[0]].exitcode
                outcome[dead[0]] = ("crash", f"process {dead[0]} of {procs} died (exit {code})")
                break
            workers[0].join(timeout=0.2)
    finally:
        failed = any(s != "ok" for s, _ in outcome.values()) or len(outcome) < procs
        for w in workers:
            if failed and w.is_alive():
                w.terminate()
            w.join()
    for rank in sorted(outcome):
        status, value = outcome[rank]
        if status == "user":
            raise UserError(value)
        if status == "crash":
            raise RuntimeError(f"{what}: rank {rank} of {procs} failed: {value}")
    return outcome[0][1]
