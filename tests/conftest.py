import pytest
import torch


def pytest_generate_tests(metafunc):
    # Suites parametrise over the seeds their class declares (random composite trees use many).
    if "seed" in metafunc.fixturenames and metafunc.cls is not None:
        metafunc.parametrize("seed", getattr(metafunc.cls, "seeds", (0,)))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
