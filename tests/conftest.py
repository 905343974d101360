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


def pytest_collection_modifyitems(config, items):
    """A test marked ``cpu_ranks`` has a stage start gloo ranks on the CPU, which a host
    with a GPU never does (``distill.launch.cpu_procs`` is 1 there; several GPUs go
    through ``accelerate launch``): it runs on CPU-only hosts (CI's) and is skipped where
    CUDA is available."""
    import torch

    if not torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CPU ranks: a host with a GPU runs a stage on the GPU")
    for item in items:
        if "cpu_ranks" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are fastest on one thread; a module asks for this with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
