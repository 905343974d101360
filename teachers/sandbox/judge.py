"""The trusted side of a sandbox run: the judge process and the value codec.

Loaded by ``harness.py`` (standard library only). The judge runs the trusted
tests; every function the untrusted code defines is a :class:`Proxy` whose calls go
to the code's process over a pipe and come back as plain data decoded here, so no
object of the code's making (with a rigged ``__eq__``, say) ever reaches an assert.
"""

import ast
import builtins
import json
import os
import select

PLAIN = (type(None), bool, int, float, str)


def encode(x, depth=0):
    """Plain data as JSON-able tagged values; exact types only (no subclasses)."""
    if depth > 200:
        raise ValueError("value nested too deeply")
    t = type(x)
    if t in PLAIN:
        return x
    d = depth + 1
    if t is list:
        return [encode(v, d) for v in x]
    if t is tuple:
        return {"t": [encode(v, d) for v in x]}
    if t is dict:
        return {"d": [[encode(k, d), encode(v, d)] for k, v in x.items()]}
    if t is set or t is frozenset:
        return {"s" if t is set else "fs": [encode(v, d) for v in x]}
    if t is bytes:
        return {"b": x.hex()}
    if t is complex:
        return {"c": [x.real, x.imag]}
    raise TypeError(f"unsupported value of type {t.__name__}")


def decode(y):
    """The inverse of :func:`encode`; anything else raises ValueError."""
    t = type(y)
    if t in PLAIN:
        return y
    if t is list:
        return [decode(v) for v in y]
    if t is dict and len(y) == 1:
        ((tag, v),) = y.items()
        if type(v) is list:
            if tag == "t":
                return tuple(decode(e) for e in v)
            if tag == "d":
                return {decode(k): decode(e) for k, e in v}
            if tag == "s":
                return {decode(e) for e in v}
            if tag == "fs":
                return frozenset(decode(e) for e in v)
            if tag == "c":
                return complex(float(v[0]), float(v[1]))
        if tag == "b" and type(v) is str:
            return bytes.fromhex(v)
    raise ValueError("malformed value")


def read_exact(fd, n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError("short read")
        buf += chunk
    return buf


def write_all(fd, data):
    while data:
        data = data[os.write(fd, data) :]


def serve_calls(setup, code, rfd, wfd):
    """The worker's loop (untrusted from here on): run the code, report the names it
    defined, then answer calls ``{"call", "args", "kwargs"}`` until the pipe closes."""

    def send(obj):
        write_all(wfd, (json.dumps(obj) + "\n").encode())

    ns = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        exec(compile(setup, "<setup>", "exec"), ns)
        exec(compile(code, "<candidate>", "exec"), ns)
    except BaseException as e:  # SystemExit too: leaving early is a failure
        send({"load_error": f"{type(e).__name__}: {e}"[:300]})
        os._exit(1)
    send({"ready": [k for k, v in list(ns.items()) if not k.startswith("_") and callable(v)]})

    def answer(req):
        try:
            value = ns[req["call"]](*decode(req["args"]), **decode(req["kwargs"]))
            return {"ok": encode(value)}
        except BaseException as e:
            return {"exc": [type(e).__name__, str(e)[:300]]}

    for line in os.fdopen(rfd, "rb"):
        req = json.loads(line)
        send({"batch": [answer(r) for r in req["batch"]]} if "batch" in req else answer(req))
    os._exit(0)


class Stop(BaseException):
    """Ends the run from inside a test (a BaseException: tests' ``except Exception``
    must not swallow it)."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status, self.reason = status, reason


class Channel:
    """The judge's end of the worker pipe: one JSON line per message."""

    def __init__(self, rfd, wfd, cap):
        self.rfd, self.wfd, self.cap, self.buf = rfd, wfd, cap, b""
        self.last = None

    def send(self, obj):
        try:
            write_all(self.wfd, (json.dumps(obj) + "\n").encode())
        except BrokenPipeError:
            raise Stop("crashed", "the program exited before the tests finished") from None

    def recv(self):
        while b"\n" not in self.buf:
            select.select([self.rfd], [], [])
            chunk = os.read(self.rfd, 1 << 16)
            if not chunk:
                raise Stop("crashed", "the program exited before the tests finished")
            self.buf += chunk
            if len(self.buf) > self.cap:
                raise Stop("failed", "return value too large")
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            return json.loads(line)
        except (ValueError, RecursionError):
            raise Stop("failed", "garbled reply from the program") from None


class Proxy:
    """Stands for a function the code defined; calls go to the worker."""

    def __init__(self, chan, name):
        self.chan, self.name = chan, name

    def __call__(self, *args, **kwargs):
        try:
            req = {"call": self.name, "args": encode(list(args)), "kwargs": encode(kwargs)}
        except (TypeError, ValueError) as e:
            raise Stop("error", f"test passes an unsupported argument: {e}") from None
        self.chan.send(req)
        value = self.result(self.chan.recv())
        self.chan.last = (self.name, args, value)
        return value

    def result(self, reply):
        """The return value a reply carries, or the exception it reports, raised."""
        if type(reply) is dict and "ok" in reply:
            try:
                return decode(reply["ok"])
            except Exception:  # whatever the code sent, it is not a plain value
                raise Stop("failed", f"{self.name} returned malformed data") from None
        if type(reply) is dict and type(reply.get("exc")) is list and len(reply["exc"]) == 2:
            name, msg = (str(x)[:300] for x in reply["exc"])
            cls = getattr(builtins, name, None)
            if isinstance(cls, type) and issubclass(cls, Exception):
                raise cls(msg)
            raise RuntimeError(f"{name}: {msg}")
        raise Stop("failed", "garbled reply from the program")


def failure_reason(test, chan, i, n):
    """A short reason for a failed assert: the call and what it returned."""
    where = f"test {i + 1}/{n}"
    if chan.last is None:
        return f"{where} failed: {test.strip()[:150]}"
    name, args, value = chan.last
    shown = ", ".join(repr(a) for a in args)
    return f"wrong answer on {where}: {name}({shown})"[:150] + f" returned {value!r}"[:120]


def simple_call(test, ns):
    """``(proxy, args, expected)`` when ``test`` is exactly ``assert NAME(literals) ==
    literal`` with NAME a proxy (the generated tests, most MBPP ones); else None."""
    try:
        (node,) = ast.parse(test).body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    cmp = node.test if isinstance(node, ast.Assert) and node.msg is None else None
    if not (isinstance(cmp, ast.Compare) and [type(o) for o in cmp.ops] == [ast.Eq]):
        return None
    call = cmp.left
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.keywords):
        return None
    proxy = ns.get(call.func.id)
    if not isinstance(proxy, Proxy):
        return None
    try:
        args = [ast.literal_eval(a) for a in call.args]
        return proxy, args, ast.literal_eval(cmp.comparators[0])
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return None


def run_batched(plans, chan):
    """All calls of simple tests in one round trip (each round trip is a hand-off
    between two processes); the comparisons are the judge's own, as in the asserts."""
    try:
        reqs = [{"call": p.name, "args": encode(a), "kwargs": encode({})} for p, a, _ in plans]
    except (TypeError, ValueError) as e:
        raise Stop("error", f"test passes an unsupported argument: {e}") from None
    chan.send({"batch": reqs})
    replies = chan.recv()
    if type(replies) is not dict or type(replies.get("batch")) is not list:
        raise Stop("failed", "garbled reply from the program")
    if len(replies["batch"]) != len(plans):
        raise Stop("failed", "garbled reply from the program")
    passed, first, n = 0, None, len(plans)
    for i, ((proxy, args, expected), reply) in enumerate(zip(plans, replies["batch"], strict=True)):
        try:
            value = proxy.result(reply)
            if value == expected:
                passed += 1
                continue
            chan.last = (proxy.name, args, value)
            reason = failure_reason("", chan, i, n)
        except Stop:
            raise
        except BaseException as e:
            reason = f"test {i + 1}/{n} raised {type(e).__name__}: {e}"[:300]
        first = first or reason
    return passed, first


def run_tests(job, chan, ns):
    """Run each trusted test; (passed count, status, reason)."""
    tests, passed, first = job["tests"], 0, None
    plans = [simple_call(t, ns) for t in tests]
    if tests and all(plans):
        passed, first = run_batched(plans, chan)
        tests = []  # all done
    for i, test in enumerate(tests):
        chan.last = None
        try:
            exec(compile(test, f"<test {i + 1}>", "exec"), ns)
            passed += 1
        except Stop:
            raise
        except AssertionError:
            first = first or failure_reason(test, chan, i, len(tests))
        except BaseException as e:
            first = first or f"test {i + 1}/{len(tests)} raised {type(e).__name__}: {e}"[:300]
    total = len(job["tests"])
    if passed == total:
        return passed, "passed", f"passed {passed}/{total} tests"
    return passed, "failed", first


def judge(mjob, chan):
    """Wait for the worker, run the tests against proxies of its functions;
    (passed count, status, reason)."""
    ns = {"__name__": "__tests__", "__builtins__": builtins}
    try:
        exec(compile(mjob["setup"], "<setup>", "exec"), ns)
        exec(compile(mjob["prelude"], "<prelude>", "exec"), ns)
    except BaseException as e:
        return 0, "error", f"test setup failed: {type(e).__name__}: {e}"[:300]
    ready = chan.recv()
    if type(ready) is dict and "load_error" in ready:
        return 0, "failed", f"the program failed to load: {str(ready['load_error'])[:250]}"
    if type(ready) is not dict or type(ready.get("ready")) is not list:
        return 0, "failed", "garbled reply from the program"
    for name in ready["ready"]:
        # a builtin name (len, sorted, ...) is never proxied: the code must not be able
        # to replace the helpers the tests use to judge it
        if type(name) is str and name.isidentifier() and name not in ns:
            if not hasattr(builtins, name):
                ns[name] = Proxy(chan, name)
    entry = mjob.get("entry_point")
    if entry:
        if entry not in ready["ready"]:
            return 0, "failed", f"no function named {entry!r}"
        ns[entry] = Proxy(chan, entry)
    return run_tests(mjob, chan, ns)
