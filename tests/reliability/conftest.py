import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One compute thread, as the subprocesses get (OMP_NUM_THREADS=1): identical floats in and out of process, and
    no thread oversubscription on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
