"""The console and the progress bar: stderr, no wrapping in a log, one bar over all ranks."""

import io
import os

from rich.console import Console

from distill import launch, progress


def _uneven_work() -> tuple[int, int, float, list[str]]:
    """Rank 0 finishes 2 items, rank 1 finishes 5 (after rank 0 is done): rank 0's bar
    must still end at 7 of 7. Also the warnings accelerate gave this rank."""
    import time
    import warnings

    from accelerate import PartialState

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = PartialState(cpu=True)
    mine = 2 if state.process_index == 0 else 5
    with progress.StageBar("work", total=7, unit="items") as bar:
        for _ in range(mine):
            if state.process_index == 1:
                time.sleep(0.1)
            bar.advance(1, tokens=10, what=f"rank {state.process_index}")
        task = bar.bar.tasks[0] if bar.bar is not None else None
    completed, total = (int(task.completed), task.total) if task else (-1, -1)
    return bar.done, completed, total, [str(w.message) for w in caught]


def test_one_bar_counts_every_ranks_work_and_ranks_do_not_warn_about_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    done, completed, total, warned = launch.spawn(_uneven_work, procs=2, what="test")
    assert done == 2  # rank 0's own share ...
    assert (completed, total) == (7, 7)  # ... and the bar counts both ranks'
    assert not [w for w in warned if "OMP_NUM_THREADS" in w]  # accelerate's, once per rank


def test_a_bar_in_one_process_counts_and_one_outside_a_with_block_draws_nothing(capsys):
    with progress.StageBar("alone", total=3, unit="tasks") as bar:
        bar.advance(2, tokens=5, what="math")
        bar.advance(1)
    assert bar.bar.tasks[0].completed == 3
    assert "alone" in capsys.readouterr().err
    idle = progress.StageBar("idle", total=3)
    idle.advance(3)
    assert idle.done == 3 and capsys.readouterr().err == ""


def test_the_log_console_never_wraps_and_transient_bars_leave_nothing(monkeypatch, capsys):
    console = progress.make_console()  # stderr is captured: not a terminal
    assert not console.is_terminal and console.soft_wrap
    long = "tokenizer: 320 tokens from 80 oracle conversations → " + "/a/long/path" * 12
    console.print(long)
    assert capsys.readouterr().err == long + "\n"
    monkeypatch.setattr(progress, "console", Console(file=io.StringIO()))
    with progress.progress(transient=True) as bar:
        bar.add_task("steps", total=2)
    assert progress.console.file.getvalue() == ""


def test_quiet_libraries_turns_off_transformers_bars(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    progress.quiet_libraries()
    assert not hf_logging.is_progress_bar_enabled()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # spawned ranks inherit it
