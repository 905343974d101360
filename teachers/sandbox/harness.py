"""The sandbox slot server: a long-lived process that serves runs one at a time, each
in fresh processes. Standard library only; started by :mod:`teachers.sandbox` as
``python -I -S harness.py CONFIG_JSON``, as root inside its own network, mount,
ipc and pid namespaces (``unshare``), where it is pid 1.

Why three processes per run: untrusted code that shares an interpreter with its tests
can fake any result (exit 0, patch the checker, read a secret token from memory). So
the tests never run where the code runs. For each run this server forks a *worker*
(own uid, resource limits) that runs the untrusted code, and a *judge* (another uid)
that runs the trusted tests against proxies of the code's functions
(``judge.py``). The judge sends its verdict to this server on a pipe the worker
does not hold and cannot reach (another uid: no ptrace, no /proc/PID/fd), and the
tests (expected values included) are read only after the worker is forked, so they
are never in its memory. Exiting early, ``os._exit(0)``, ``SystemExit``, replacing
``check`` or the assertion helpers all happen in the worker and leave the judge's
tests failing. After the verdict (or the deadline) the server kills every other
process of its pid namespace (fork bombs included), reaps them, and wipes its private
tmpfs directories, so nothing of one run reaches the next.

Protocol: per run, on stdin 8 bytes (two big-endian u32 lengths), the worker's JSON,
the judge's JSON; on stdout one verdict line (JSON).
"""

import ctypes
import fcntl
import importlib.util
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys
import time

_spec = importlib.util.spec_from_file_location(
    "sandbox_judge", os.path.join(os.path.dirname(os.path.abspath(__file__)), "judge.py")
)
judge_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(judge_mod)
read_exact, write_all = judge_mod.read_exact, judge_mod.write_all
SCRATCH = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
MS_BIND, MS_REC = 0x1000, 0x4000


def drop_privileges(uid):
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise RuntimeError("could not drop root")


def no_new_privs():
    # setuid binaries (su, mount, ...) must not give privileges back after the drop
    try:
        ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    except (OSError, AttributeError):
        pass


def mount_scratch(size_mb):
    """Private, size-capped tmpfs over every world-writable directory, so nothing
    the code writes outside its working directory reaches the host."""
    libc = ctypes.CDLL(None, use_errno=True)
    for path in SCRATCH:
        if os.path.isdir(path):
            opts = f"size={size_mb}m,nr_inodes=10000,mode=1777".encode()
            if libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, opts) != 0 and path == "/tmp":
                raise OSError(ctypes.get_errno(), "mount tmpfs on /tmp failed")


def expose_stdlib():
    """The sandbox uids must read the standard library, which may live under a private
    home (``/root/.pyenv``): cover the first directory others cannot enter with an
    empty tmpfs and bind the interpreter's prefix back at its path. The rest of that
    home is hidden from the code as a bonus."""
    prefix = os.path.realpath(sys.base_prefix)
    parts = prefix.split("/")
    blocked = next(
        (d for d in ("/".join(parts[:i]) for i in range(2, len(parts) + 1))
         if not os.stat(d).st_mode & 0o001),
        None,
    )  # fmt: skip
    if blocked is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(prefix, os.O_PATH)
    if libc.mount(b"tmpfs", blocked.encode(), b"tmpfs", 0, b"size=1m,mode=755") != 0:
        raise OSError(ctypes.get_errno(), f"mount tmpfs on {blocked} failed")
    os.makedirs(prefix, 0o755, exist_ok=True)
    src = f"/proc/self/fd/{fd}".encode()
    if libc.mount(src, prefix.encode(), None, MS_BIND | MS_REC, None) != 0:
        raise OSError(ctypes.get_errno(), f"bind mount of {prefix} failed")
    os.close(fd)


def worker(job, cfg, rfd, wfd, out_fd):
    """The untrusted side: limits, uid drop, run the code, then serve calls."""
    if not cfg["pidns"]:
        os.setsid()  # a process group to kill afterwards
    null = os.open("/dev/null", os.O_RDONLY)
    # move the sources out of the way first: a source may sit on a target number
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (null, out_fd, out_fd, rfd, wfd)]
    for dst, src in enumerate(high):
        os.dup2(src, dst)
    # everything else this server held (its stdin with the tests, the verdict pipe,
    # the judge's pipe ends) is closed before any untrusted code runs
    os.closerange(5, 1 << 16)
    lim = job["limits"]
    cpu = max(1, int(lim["cpu_s"] + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (lim["memory_mb"] << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.chdir(job["workdir"])
    os.umask(0o077)
    os.environ.clear()  # the interpreter's own LC_CTYPE coercion; nothing else is set
    if cfg["worker_uid"] is not None:
        drop_privileges(cfg["worker_uid"])
    no_new_privs()
    judge_mod.serve_calls(job["setup"], job["code"], 3, 4)


def judge(mjob, cfg, rfd, wfd, verdict_fd):
    """The trusted side: drop to the judge uid, run the tests, send the verdict."""
    os.dup2(os.open("/dev/null", os.O_RDWR), 0)
    os.dup2(0, 1)
    if cfg["judge_uid"] is not None:
        drop_privileges(cfg["judge_uid"])
    no_new_privs()
    try:
        passed, status, reason = judge_mod.judge(
            mjob, judge_mod.Channel(rfd, wfd, mjob["reply_bytes"])
        )
    except judge_mod.Stop as e:
        passed, status, reason = 0, e.status, e.reason
    except BaseException as e:
        passed, status, reason = 0, "error", f"judge: {type(e).__name__}: {e}"[:300]
    write_all(verdict_fd, (json.dumps([passed, status, reason]) + "\n").encode())
    os._exit(0)


def worker_death(pid, out_fd):
    """Why the worker is gone, from its exit status and the tail of its output."""
    status = None
    for _ in range(100):  # its pipe closes a moment before its exit status is ready
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        time.sleep(0.002)
    if status is None:
        return "the program closed its pipe before the tests finished"
    if os.WIFSIGNALED(status):
        known = {
            signal.SIGXCPU: "CPU time limit exceeded",
            signal.SIGXFSZ: "output or file size limit exceeded",
            signal.SIGKILL: "killed (memory or process limit)",
        }
        sig = os.WTERMSIG(status)
        return known.get(sig, f"killed by signal {sig}")
    size = os.fstat(out_fd).st_size
    tail = os.pread(out_fd, 200, max(0, size - 200)).decode("utf-8", "replace").strip()
    msg = f"the program exited with status {os.WEXITSTATUS(status)} before the tests finished"
    return msg + (f" ({tail.splitlines()[-1][:120]})" if tail else "")


def fork_into(fn, *args):
    pid = os.fork()
    if pid == 0:
        try:
            fn(*args)
        finally:
            os._exit(1)
    return pid


def one_run(cfg, job, n2, pids):
    """Fork the worker, read the tests, fork the judge, wait for the verdict."""
    deadline = time.monotonic() + job["limits"]["timeout_s"]
    job["workdir"] = os.path.join(cfg["base"], "work")
    os.mkdir(job["workdir"], 0o700)
    if cfg["worker_uid"] is not None:
        os.chown(job["workdir"], cfg["worker_uid"], cfg["worker_uid"])
    out_path = os.path.join(cfg["base"], ".sandbox-out")
    out_w = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    out_r = os.open(out_path, os.O_RDONLY)
    (a_r, a_w), (b_r, b_w), (v_r, v_w) = os.pipe(), os.pipe(), os.pipe()
    held = {a_r, a_w, b_r, b_w, v_r, v_w, out_r, out_w}
    try:
        pids[0] = fork_into(worker, job, cfg, a_r, b_w, out_w)
        close(held, a_r, b_w, out_w)
        mjob = json.loads(read_exact(0, n2))
        job["mjob_read"] = True
        mjob["reply_bytes"] = job["limits"]["reply_bytes"]
        pids[1] = fork_into(judge, mjob, cfg, b_r, a_w, v_w)
        close(held, b_r, a_w, v_w)
        total = len(mjob["tests"])
        line = read_line(v_r, deadline)
        if line is None:
            return [0, "timeout", f"timeout after {job['limits']['timeout_s']:g}s", total]
        passed, status, reason = json.loads(line)
        if status == "crashed":
            reason = worker_death(pids[0], out_r)
        return [passed, status, reason, total]
    finally:
        close(held, *list(held))


def close(held, *fds):
    """Close ``fds`` once each (this server lives long: no fd may leak)."""
    for fd in fds:
        held.discard(fd)
        try:
            os.close(fd)
        except OSError:
            pass


def read_line(fd, deadline):
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return json.dumps([0, "error", "the judge died"])
        buf += chunk
    return buf.split(b"\n", 1)[0]


def kill_all(cfg, wpid, jpid):
    """Every process of the run dies before the next run starts."""
    if cfg["pidns"]:
        # as pid 1 of the namespace, kill(-1) reaches every other process in it,
        # orphans included, and they are all ours to reap
        while True:
            try:
                os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return
    for pid, group in ((wpid, True), (jpid, False)):
        if pid is None:
            continue
        try:
            os.killpg(pid, signal.SIGKILL) if group else os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def wipe(cfg):
    dirs = SCRATCH if cfg["mounts"] else (cfg["base"],)
    for d in dirs:
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        for name in entries:
            path = os.path.join(d, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def serve(cfg):
    """Runs until stdin closes (the parent exited or let the slot go)."""
    if cfg["mounts"]:
        mount_scratch(cfg["tmpfs_mb"])
        if cfg["worker_uid"] is not None:
            expose_stdlib()
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    while True:
        try:
            n1, n2 = struct.unpack("!II", read_exact(0, 8))
        except EOFError:
            os._exit(0)
        job = json.loads(read_exact(0, n1))
        pids = [None, None]
        try:
            passed, status, reason, total = one_run(cfg, job, n2, pids)
        except Exception as e:
            if not job.get("mjob_read"):
                read_exact(0, n2)  # stay in step with the parent
            passed, status, reason, total = 0, "error", f"sandbox: {type(e).__name__}: {e}", 0
        verdict = {"status": status, "passed": passed, "total": total, "reason": reason[:400]}
        write_all(1, (json.dumps(verdict) + "\n").encode())
        # the verdict goes out first; the next job waits in the pipe until this is done
        kill_all(cfg, *pids)
        wipe(cfg)


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
