"""Shared test setup: nothing may reach a hub, and tests stay on few threads so the
suite behaves the same on a 2-core CI machine."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# stages run in this process: spawning workers per test would only add start-up time
os.environ.setdefault("DISTILL_CPU_PROCS", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are fastest on one thread; a module asks for this with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
