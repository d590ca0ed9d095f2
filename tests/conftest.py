import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty Dynamo caches (tests build many models of the same class)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
    torch.compiler.set_stance("default")  # a test that leaked another stance must not fail the ones after it


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP spin-waiting makes tiny models' forwards 5-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_models():
    """The ../shared folder; skips the test with a clear message when it is absent."""
    from qcompile.zoo import shared_dir

    root = shared_dir()
    if root is None:
        pytest.skip("../shared is absent (set QDIFF_SHARED to its path to run the trained-model tests)")
    return root
