"""Run untrusted Python against trusted tests, each run in fresh processes, many at once.

Runs go to slot servers (``teachers/sandbox/harness.py``, one per concurrent run,
started once with an empty environment). As root (the usual CI and container case) a
slot server lives in its own network, mount, ipc and pid namespaces (``unshare``): no
network at all (the loopback is down), a private size-capped tmpfs over every
world-writable directory (the run's working directory lives there and is wiped after
the run), a fresh ``/proc``, and every process a run starts is killed before the next
run. For each run it forks a worker that runs the untrusted code as its own
unprivileged uid, with limits on CPU time, address space, processes, file size (its
captured output is a file too) and open files, and a judge, as another uid, that runs
the tests and calls the code's functions through a pipe; the harness docstring says
why a pass cannot be faked. Without root, user namespaces give the same namespaces
without the uid separation, and where those are missing only the resource limits
remain: no network isolation (:func:`isolation` says which; README "Sandbox and
security").
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

HARNESS = str(Path(__file__).with_name("harness.py"))
NS_FLAGS = ["--net", "--mount", "--ipc", "--pid", "--fork", "--kill-child", "--mount-proc"]
# Each concurrent run gets its own uid pair, so RLIMIT_NPROC (counted per uid) of one
# fork bomb never starves another run, and no run can signal or trace another.
UID_BASE = 200_000
GRACE_S = 2.0  # past the run's own timeout, before a silent slot server is killed
SLOTS = 64
TMPFS_MB = 32  # size of each private tmpfs (/tmp, /var/tmp, /dev/shm, /run/lock)


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run."""

    timeout_s: float = 2.0  # wall clock: loading the code and every test
    cpu_s: float = 2.0  # CPU time of the code (RLIMIT_CPU)
    memory_mb: int = 512  # address space of the code (RLIMIT_AS)
    nproc: int = 16  # processes the code may have (RLIMIT_NPROC, own uid)
    file_bytes: int = 1 << 20  # any file written, stdout/stderr included (RLIMIT_FSIZE)
    reply_bytes: int = 4 << 20  # largest return value (JSON) accepted from the code


@dataclass(frozen=True)
class Program:
    """Untrusted ``code`` and the trusted tests that judge it.

    ``tests`` run one by one in the test process, where every function the code
    defines (and ``entry_point`` always) is a proxy to the code's process. ``setup``
    runs before the code and before the tests (MBPP ``test_setup_code``); ``prelude``
    runs before the tests only (a HumanEval prompt: helpers the tests call).
    """

    code: str
    tests: Sequence[str]
    setup: str = ""
    prelude: str = ""
    entry_point: str | None = None


@dataclass(frozen=True)
class RunResult:
    """``status``: passed, failed, timeout, crashed (the code's process died) or error
    (the sandbox or the tests themselves failed)."""

    status: str
    passed: int
    total: int
    reason: str
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "passed"


@cache
def isolation() -> str:
    """``root`` (namespaces + uid drop), ``userns`` (namespaces, one uid) or ``limits``
    (resource limits only: no network isolation)."""
    if shutil.which("unshare") is None:
        return "limits"
    if os.geteuid() == 0:
        return "root" if _probe(["unshare", *NS_FLAGS]) else "limits"
    return "userns" if _probe(["unshare", "--map-root-user", *NS_FLAGS]) else "limits"


def _probe(cmd: list[str]) -> bool:
    try:
        return subprocess.run([*cmd, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class _Slot:
    """One slot server (``harness.py``): serves one run at a time, each in
    fresh processes, inside namespaces made once per slot."""

    def __init__(self, index: int, mode: str) -> None:
        self.index, self.mode = index, mode
        self.proc: subprocess.Popen | None = None
        self.base: str | None = None

    def start(self) -> None:
        # as root the code never runs as root, namespaces or not
        worker_uid, judge_uid = _uids(self.index) if os.geteuid() == 0 else (None, None)
        if self.mode == "userns":
            worker_uid = judge_uid = None  # only root is mapped in the user namespace
        if self.mode == "limits":
            self.base = tempfile.mkdtemp(prefix="distill-sandbox-")
            os.chmod(self.base, 0o711)  # the run's uid enters its own working directory
        cfg = {
            "worker_uid": worker_uid,
            "judge_uid": judge_uid,
            "mounts": self.mode != "limits",
            "pidns": self.mode != "limits",
            "base": self.base or "/tmp",
            "tmpfs_mb": TMPFS_MB,
        }
        prefix = {
            "root": ["unshare", *NS_FLAGS],
            "userns": ["unshare", "--map-root-user", *NS_FLAGS],
        }
        self.proc = subprocess.Popen(
            [*prefix.get(self.mode, []), sys.executable, "-I", "-S", HARNESS, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={},
            cwd="/",
            start_new_session=True,  # a Ctrl-C reaches the parent only; killpg reaches all
        )
        self.buf = b""

    def run(self, data: bytes, limits: Limits, total: int) -> RunResult:
        for _ in range(2):  # a slot server that died is restarted once
            if self.proc is None or self.proc.poll() is not None:
                self.stop()
                self.start()
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
                break
            except (BrokenPipeError, OSError):
                self.stop()
        else:
            return RunResult("error", 0, total, "the sandbox server does not start")
        line = self._read_line(time.monotonic() + limits.timeout_s + GRACE_S)
        if line == b"":
            self.stop()
            return RunResult("error", 0, total, "the sandbox server died during the run")
        if line is None:
            # the server times the run out itself; silence past the grace means it is
            # stuck, so it goes, with its namespaces and everything in them
            self.stop()
            return RunResult("timeout", 0, total, f"timeout after {limits.timeout_s:g}s")
        try:
            reply = json.loads(line)
            return RunResult(
                reply["status"], int(reply["passed"]), int(reply["total"]), str(reply["reason"])
            )
        except (ValueError, KeyError, TypeError):
            self.stop()
            return RunResult("error", 0, total, "sandbox gave no verdict")

    def _read_line(self, deadline: float) -> bytes | None:
        """The next verdict line; None past the deadline, b"" if the server died."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def stop(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            self.proc = None
        if self.base:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None


class _Pool:
    """Slot servers shared by every caller in this process; one run per slot."""

    def __init__(self) -> None:
        self.free: list[_Slot] = []
        self.made = 0
        self.owner = os.getpid()
        self.cond = threading.Condition()

    def take(self) -> _Slot:
        with self.cond:
            while not self.free and self.made >= SLOTS:
                self.cond.wait()
            if self.free:
                return self.free.pop()
            self.made += 1
            return _Slot(self.made - 1, isolation())

    def give(self, slot: _Slot) -> None:
        with self.cond:
            self.free.append(slot)
            self.cond.notify()

    def close(self) -> None:
        """Stop every idle slot server (they also stop when this process exits)."""
        if os.getpid() != self.owner:  # a fork's copy: the servers are the parent's
            return
        with self.cond:
            for slot in self.free:
                slot.stop()
            self.made -= len(self.free)
            self.free.clear()


_POOL = _Pool()
atexit.register(lambda: _POOL.close())


def _forget_pool_in_child() -> None:
    # a forked process (a verify_many worker) must not share the parent's slot
    # servers: their pipes would interleave two conversations
    global _POOL
    _POOL = _Pool()


os.register_at_fork(after_in_child=_forget_pool_in_child)


def _uids(slot: int) -> tuple[int, int]:
    # the pid keeps two processes that both run sandboxes apart too
    base = UID_BASE + ((os.getpid() % 32768) * SLOTS + slot) * 2
    return base, base + 1


def whole_statements(source: str) -> str:
    """The longest run of whole top-level statements ``source`` starts with. A HumanEval
    prompt may end in a bare signature whose body is the completion (``def f(x):``):
    as a prelude it keeps its imports and helpers and drops the unfinished definition
    (the program itself is prompt + completion)."""
    lines = source.splitlines(keepends=True)
    # where a top-level statement may start: column 0, not a comment or a closing bracket
    starts = [i for i, line in enumerate(lines) if line[:1] not in ("", " ", "\t", "\n", "#")]
    for end in [len(lines), *reversed(starts)]:
        head = "".join(lines[:end])
        try:
            compile(head, "<prelude>", "exec", dont_inherit=True)
            return head
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
    return ""


def _job_bytes(program: Program, limits: Limits) -> bytes:
    """The slot server's framing: two lengths, the worker's part, the judge's part."""
    job = {"code": program.code, "setup": program.setup, "limits": asdict(limits)}
    mjob = {
        "tests": list(program.tests),
        "setup": program.setup,
        "prelude": whole_statements(program.prelude),
        "entry_point": program.entry_point,
    }
    a, b = json.dumps(job).encode(), json.dumps(mjob).encode()
    return struct.pack("!II", len(a), len(b)) + a + b


def run(program: Program, limits: Limits | None = None) -> RunResult:
    """Run ``program`` in a fresh sandbox and judge it by its tests."""
    limits = limits or Limits()
    data = _job_bytes(program, limits)
    start = time.monotonic()
    slot = _POOL.take()
    try:
        result = slot.run(data, limits, len(program.tests))
    finally:
        _POOL.give(slot)
    return RunResult(**{**asdict(result), "seconds": time.monotonic() - start})


def run_batch(
    programs: Sequence[Program],
    workers: int | None = None,
    limits: Limits | None = None,
    progress: bool = False,
) -> list[RunResult]:
    """Run many programs, ``workers`` sandboxes at a time (default: two per core);
    results in input order. Threads only wait: the work is in the sandbox processes,
    and a hostile program costs its own slot at most ``limits.timeout_s``."""
    # two runs per core by default: a run is mostly hand-offs between its processes
    workers = workers or 2 * (os.cpu_count() or 1)
    results: list[RunResult | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=min(workers, SLOTS)) as pool:
        futures = {pool.submit(run, p, limits): i for i, p in enumerate(programs)}
        done_iter = _progress(futures, len(programs)) if progress else futures
        for fut in done_iter:
            results[futures[fut]] = fut.result()
    return [r for r in results if r is not None]


def _progress(futures: dict, total: int):
    from concurrent.futures import as_completed

    from distill.progress import progress

    with progress(transient=True) as bar:
        task = bar.add_task("sandbox", total=total, unit="runs")
        for fut in as_completed(futures):
            bar.advance(task)
            yield fut


__all__ = ["Limits", "Program", "RunResult", "isolation", "run", "run_batch"]
