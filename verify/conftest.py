"""Shared test settings for verify/."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The suite's tensors are tiny: one thread is as fast, and immune to oversubscribed cores
    (with other work on a 2-core machine, OpenMP spin-waiting made tests ~20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
