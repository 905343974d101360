"""The sandbox against hostile programs: every one is contained and fails, nothing it
starts or writes survives the run, and the pool keeps serving correct programs."""

from __future__ import annotations

import importlib.util
import os
import socket
import time
from pathlib import Path

import pytest

from teachers import sandbox
from teachers.sandbox import Limits, Program, isolation, run, run_batch

FAST = Limits(timeout_s=1.0, cpu_s=1.0, memory_mb=256, nproc=8, file_bytes=64 << 10)
GOOD = Program(
    "def f(xs):\n    return [x + 3 for x in xs]\n", ["assert f([1, 2]) == [4, 5]"], entry_point="f"
)
TEST_F = ["assert f([1, 2]) == [4, 5]"]
NAMESPACES = pytest.mark.skipif(isolation() == "limits", reason="needs namespaces (root or userns)")


def _judge_module():
    path = Path(sandbox.__file__).with_name("judge.py")
    spec = importlib.util.spec_from_file_location("sandbox_judge_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sandbox_processes() -> list[int]:
    """Host pids of processes running as one of this process's sandbox uids (the uids
    carry the pid, sandbox._uids: another process's sandboxes, such as a parallel test
    worker's, are not this run's survivors)."""
    uids = {u for slot in range(sandbox.SLOTS) for u in sandbox._uids(slot)}
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid in uids:
                    pids.append(int(entry))
            except FileNotFoundError:
                pass
    return pids


HOSTILE = {
    "infinite_loop": "def f(xs):\n    while True:\n        pass\n",
    "fork_bomb": (
        "import os\n"
        "def f(xs):\n"
        "    while True:\n"
        "        try:\n"
        "            os.fork()\n"
        "        except OSError:\n"
        "            pass\n"
    ),
    "memory_hog": "def f(xs):\n    hog = bytearray(2 << 30)\n    return [x + 3 for x in xs]\n",
    "huge_output": "def f(xs):\n    while True:\n        print('x' * 10000)\n",
    "exit_zero_on_load": "import sys\nsys.exit(0)\n",
    "os_exit_on_load": "import os\nos._exit(0)\n",
    "os_exit_in_call": "import os\ndef f(xs):\n    os._exit(0)\n",
    "raise_system_exit": "def f(xs):\n    raise SystemExit(0)\n",
    "rigged_eq": (
        "class Anything(list):\n"
        "    def __eq__(self, other):\n"
        "        return True\n"
        "def f(xs):\n"
        "    return Anything()\n"
    ),
    "patched_checker": (
        "import builtins, os, sys, json\n"
        "builtins.AssertionError = type('Nope', (Exception,), {})\n"
        "def check(candidate):\n"
        "    pass\n"
        "verdict = json.dumps({'status': 'passed', 'passed': 1, 'total': 1, 'reason': 'ok'})\n"
        "for fd in (1, 2):\n"
        "    os.write(fd, (verdict + '\\n').encode())\n"
        "for path in ('/proc/1/fd/1', '/proc/1/fd/0'):\n"
        "    try:\n"
        "        open(path, 'w').write(verdict + '\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        "def f(xs):\n"
        "    return None\n"
    ),
    "kill_everything": "import os, signal\ndef f(xs):\n    os.kill(-1, signal.SIGKILL)\n",
    "len_override": "def len(x):\n    return 2\ndef f(xs):\n    return [0, 0]\n",
}


@pytest.fixture(scope="module")
def hostile_results():
    """Every hostile program in one batch, with correct programs around them: one
    run of the pool serves them all."""
    names = list(HOSTILE)
    programs = [Program(HOSTILE[n], TEST_F, entry_point="f") for n in names]
    len_test = Program(
        HOSTILE["len_override"], ["assert len(f([1, 2])) == 2 and f([1]) == [4]"], entry_point="f"
    )
    start = time.monotonic()
    results = run_batch([GOOD, *programs, len_test, GOOD, GOOD], workers=4, limits=FAST)
    elapsed = time.monotonic() - start
    by_name = dict(zip(names, results[1:-3], strict=True))
    by_name["len_override"] = results[-3]
    return {"by_name": by_name, "good": [results[0], *results[-2:]], "elapsed": elapsed}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_fails(hostile_results, name):
    result = hostile_results["by_name"][name]
    assert not result.ok, f"{name} passed: {result}"
    assert result.passed == 0


def test_pool_serves_correct_programs_around_hostile_ones(hostile_results):
    assert all(r.ok for r in hostile_results["good"]), hostile_results["good"]
    # 4 slots, two 1 s timeouts: hostile runs cost their own slot, nothing more
    assert hostile_results["elapsed"] < 8


def test_failure_reasons_name_the_limit(hostile_results):
    r = hostile_results["by_name"]
    assert (
        r["infinite_loop"].status == "timeout" and "timeout after 1s" in r["infinite_loop"].reason
    )
    assert "File too large" in r["huge_output"].reason  # RLIMIT_FSIZE on the output
    assert "MemoryError" in r["memory_hog"].reason
    assert "SystemExit" in r["exit_zero_on_load"].reason
    assert "exited with status 0" in r["os_exit_on_load"].reason
    assert "exited with status 0" in r["os_exit_in_call"].reason
    assert "unsupported value of type Anything" in r["rigged_eq"].reason


def test_nothing_survives_a_run(hostile_results):
    time.sleep(0.1)
    assert _sandbox_processes() == []


def test_passing_and_failing_programs():
    assert run(GOOD).ok
    wrong = run(Program("def f(xs):\n    return xs\n", TEST_F, entry_point="f"))
    assert wrong.status == "failed"
    assert wrong.reason == "wrong answer on test 1/1: f([1, 2]) returned [1, 2]"
    missing = run(Program("def g(xs):\n    return xs\n", TEST_F, entry_point="f"))
    assert missing.reason == "no function named 'f'"


def test_score_counts_tests_passed():
    tests = ["assert f([1]) == [4]", "assert f([]) == []", "assert f([0]) == [99]"]
    result = run(Program(GOOD.code, tests, entry_point="f"))
    assert (result.status, result.passed, result.total) == ("failed", 2, 3)


def test_exceptions_cross_to_the_tests():
    code = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n"
    tests = ["try:\n    f(-1)\n    assert False\nexcept ValueError:\n    pass", "assert f(2) == 2"]
    assert run(Program(code, tests, entry_point="f")).ok


def test_environment_is_empty(monkeypatch):
    monkeypatch.setenv("DISTILL_SECRET", "s3cret-value")
    code = (
        "import os, glob\n"
        "def leak():\n"
        "    found = repr(dict(os.environ))\n"
        "    for path in glob.glob('/proc/*/environ'):\n"
        "        try:\n"
        "            found += open(path, 'rb').read().decode('latin-1')\n"
        "        except OSError:\n"
        "            pass\n"
        "    return found\n"
    )
    assert run(
        Program(code, ["assert 's3cret-value' not in leak()", "assert leak().startswith('{}')"])
    ).ok


@NAMESPACES
def test_no_network():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = (
        "import socket\n"
        "def connect(port):\n"
        "    try:\n"
        "        socket.create_connection(('127.0.0.1', port), timeout=0.5).close()\n"
        "        return 'connected'\n"
        "    except OSError as e:\n"
        "        return type(e).__name__\n"
    )
    try:
        result = run(Program(code, [f"assert connect({port}) != 'connected'"]))
        assert result.ok, result
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


@NAMESPACES
def test_writes_outside_the_working_directory_do_not_reach_the_host(tmp_path):
    repo_file = Path(sandbox.__file__).parent / "sandbox-escape-probe"
    host_tmp = Path("/tmp") / f"sandbox-escape-probe-{os.getpid()}"
    targets = [str(repo_file), str(host_tmp), str(tmp_path / "probe"), "/root/sandbox-escape-probe"]
    code = (
        "import os\n"
        "def escape(paths):\n"
        "    done = []\n"
        "    for p in paths:\n"
        "        try:\n"
        "            open(p, 'w').write('x')\n"
        "            done.append(p)\n"
        "        except OSError:\n"
        "            pass\n"
        "    open('inside.txt', 'w').write('ok')\n"
        "    return done, os.getcwd()\n"
    )
    # only the private /tmp is writable, and it is not the host's
    tests = [f"done, cwd = escape({targets!r})\nassert done == [{str(host_tmp)!r}]"]
    assert run(Program(code, tests)).ok
    for path in targets:
        assert not Path(path).exists(), path


def test_working_directory_is_fresh_for_every_run():
    code = (
        "import os\n"
        "def mark():\n"
        "    seen = os.listdir('.') + os.listdir('/tmp')\n"
        "    open('left-behind', 'w').write('x')\n"
        "    open('/tmp/left-behind', 'w').write('x')\n"
        "    return [n for n in seen if n == 'left-behind']\n"
    )
    programs = [Program(code, ["assert mark() == []"])] * 4
    results = run_batch(programs, workers=1)
    assert all(r.ok for r in results), results


def test_codec_round_trips_plain_values_only():
    judge = _judge_module()
    value = [
        1,
        -2.5,
        float("inf"),
        "s",
        None,
        True,
        (1, (2,)),
        {"a": {3, 4}},
        frozenset({1}),
        b"\x00",
        1j,
    ]
    assert judge.decode(judge.encode(value)) == value
    assert type(judge.decode(judge.encode((1, 2)))) is tuple

    class Sneaky(int):
        pass

    with pytest.raises(TypeError):
        judge.encode(Sneaky(3))
    with pytest.raises(ValueError):
        judge.decode({"x": 1})


def test_limits_only_mode_still_judges():
    # the fallback where namespaces are missing: resource limits and a temporary
    # directory only, exercised here by forcing the mode
    slot = sandbox._Slot(sandbox.SLOTS - 1, "limits")
    data = sandbox._job_bytes(GOOD, FAST)
    try:
        assert slot.run(data, FAST, 1).ok
        bad = Program("import os\nos._exit(0)\n", TEST_F, entry_point="f")
        assert slot.run(sandbox._job_bytes(bad, FAST), FAST, 1).status == "crashed"
        if os.geteuid() == 0:  # never root, namespaces or not
            who = Program("import os\ndef uid():\n    return os.getuid()\n", ["assert uid() > 0"])
            assert slot.run(sandbox._job_bytes(who, FAST), FAST, 1).ok
        base = slot.base
    finally:
        slot.stop()
    assert base and not os.path.exists(base)


def test_batched_and_sequential_tests_judge_alike():
    # plain `assert f(literals) == literal` tests go in one round trip; anything else
    # runs statement by statement; both must give the same verdict
    code = "def f(x):\n    if x == 0:\n        raise ValueError('zero')\n    return x * 2\n"
    simple = ["assert f(1) == 2", "assert f(2) == 5", "assert f(0) == 0", "assert f(3) == 6"]
    stepwise = [t.replace("assert f(", "y = f(").replace(") ==", ")\nassert y ==") for t in simple]
    a, b = run_batch(
        [Program(code, simple, entry_point="f"), Program(code, stepwise, entry_point="f")]
    )
    assert (a.status, a.passed, a.total) == (b.status, b.passed, b.total) == ("failed", 2, 4)
    assert a.reason == "wrong answer on test 2/4: f(2) returned 4"
    assert b.reason == a.reason
    raised = run(Program(code, ["assert f(0) == 0"], entry_point="f"))
    assert raised.reason == "test 1/1 raised ValueError: zero"


def test_code_holds_only_its_own_pipes():
    # stdin, output file twice, the two call pipes; the listing itself opens the sixth
    code = "import os\ndef fds():\n    return sorted(int(x) for x in os.listdir('/proc/self/fd'))\n"
    assert run(Program(code, ["assert fds() == [0, 1, 2, 3, 4, 5]"])).ok


def test_a_prompt_that_is_only_a_signature_is_completed_by_its_body():
    """HumanEval-format record whose prompt ends in a bare signature (MBPP prompts often
    do) and whose completion is the indented body: the program is prompt + completion,
    and the prompt's helpers still judge it."""
    from teachers.code import DOMAIN

    record = {
        "task_id": "probe/0",
        "prompt": "import math\n\ndef half(x):\n    return x / 2\n\ndef probe(x):\n",
        "test": "def check(f):\n    assert f(6) == half(6) + math.sqrt(16)\n",
        "entry_point": "probe",
    }
    task = DOMAIN.from_record(record, 0)
    answer = [*task.messages, {"role": "assistant", "content": "    return x / 2 + 4\n"}]
    assert DOMAIN.verify(task, answer).passed, DOMAIN.verify(task, answer).reason
    wrong = [*task.messages, {"role": "assistant", "content": "    return x\n"}]
    assert not DOMAIN.verify(task, wrong).passed
    record["prompt"] = "def probe(x):\n"
    record["test"] = "def check(f):\n    assert f(2) == 5\n"
    task = DOMAIN.from_record(record, 1)
    answer = [*task.messages, {"role": "assistant", "content": "    return x + 3\n"}]
    assert DOMAIN.verify(task, answer).passed, DOMAIN.verify(task, answer).reason
