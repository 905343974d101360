"""The CPU launcher: spawned ranks form one gloo group, results and errors come back."""

import os

import pytest

from distill import launch
from distill.errors import UserError


def _all_reduce_rank() -> tuple[int, float]:
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=True)
    x = torch.tensor([float(state.process_index + 1)])
    torch.distributed.all_reduce(x)
    return state.num_processes, float(x)


def _fail_on_rank_one() -> None:
    import time

    if os.environ["RANK"] == "1":
        raise UserError("train.learning_rate: rank one says no")
    time.sleep(60)  # rank 0 must be stopped by the parent, not wait this out


def _die_on_rank_one() -> None:
    import time

    if os.environ["RANK"] == "1":
        os._exit(3)
    time.sleep(60)


def test_spawned_ranks_form_one_group():
    world, total = launch.spawn(_all_reduce_rank, procs=2, what="test")
    assert world == 2
    assert total == 3.0  # 1 + 2: both ranks took part in the all-reduce


def test_user_error_of_a_rank_is_raised_unchanged_and_stops_the_others():
    import time

    t0 = time.time()
    with pytest.raises(UserError, match="rank one says no"):
        launch.spawn(_fail_on_rank_one, procs=2, what="test")
    assert time.time() - t0 < 45


def test_a_dead_rank_is_reported():
    with pytest.raises(RuntimeError, match="died"):
        launch.spawn(_die_on_rank_one, procs=2, what="test")


def test_cpu_procs_reads_the_environment(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU host
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv(launch.ENV, "3")
    assert launch.cpu_procs() == 3
    monkeypatch.setenv(launch.ENV, "auto")
    assert launch.cpu_procs() == min(os.cpu_count() or 1, launch.MAX_AUTO)
    monkeypatch.setenv("WORLD_SIZE", "2")  # already launched: never spawn again
    assert launch.cpu_procs() == 1
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv(launch.ENV, "many")
    with pytest.raises(UserError, match="DISTILL_CPU_PROCS"):
        launch.cpu_procs()


def _sleep_then_write(out: str) -> None:
    """A rank that says it started, then writes after a while (what a rank does when it
    finishes its stage)."""
    import time
    from pathlib import Path

    Path(out, f"started-{os.environ['RANK']}-{os.getpid()}").touch()
    time.sleep(2)
    Path(out, f"finished-{os.environ['RANK']}").touch()


PARENT = """
import sys, time
sys.path.insert(0, sys.argv[2])
from distill import launch
import test_launch
launch.spawn(test_launch._sleep_then_write, sys.argv[1], procs=2, what="test")
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] not in "ZX"  # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_ranks_die_with_the_process_that_spawned_them(tmp_path, sig):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    tests = str(Path(__file__).parent)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), tests])
    deadline = time.time() + 120
    while len(list(tmp_path.glob("started-*"))) < 2:
        assert time.time() < deadline and parent.poll() is None, "ranks did not start"
        time.sleep(0.05)
    pids = [int(p.name.rsplit("-", 1)[1]) for p in tmp_path.glob("started-*")]
    parent.send_signal(getattr(signal, sig))  # the main process alone, not its group
    parent.wait()
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
    time.sleep(2.5)  # long enough for a surviving rank to have finished
    assert not list(tmp_path.glob("finished-*"))


def _train_twice(root: str) -> list[bool]:
    """Two trainings in one process, as the DSA phases run (dense, warm-up, sparse)."""
    from tiny_artifacts import ARCH

    from distill.recipe.schema import TrainConfig
    from distill.train import train

    cfg = TrainConfig(max_steps=2, batch_tokens=512, micro_batch_tokens=256, max_length=128,
                      precision="fp32", warmup_steps=1)  # fmt: skip
    done = []
    for phase in ("first", "second"):
        rep = train(init=ARCH, tokenizer_dir=f"{root}/tok", shards={"math": f"{root}/math"},
                    out_dir=f"{root}/{phase}/model", run_dir=f"{root}/{phase}", cfg=cfg)  # fmt: skip
        done.append(rep["finished"])
    return done


@pytest.mark.cpu_ranks
def test_two_trainings_in_one_group_of_ranks(tmp_path):
    """accelerate's end_training destroys the process group that every Accelerator of the
    process shares: a second training on two ranks then failed ('Default process group
    has not been initialized'). The trainer keeps the group until the process ends."""
    import random

    from tiny_artifacts import make_tokenizer, math_trace, write_shards

    make_tokenizer(tmp_path / "tok")
    rng = random.Random(0)
    write_shards(tmp_path / "math", "math", [math_trace(i, rng) for i in range(24)])
    assert launch.spawn(_train_twice, str(tmp_path), procs=2, what="test") == [True, True]
