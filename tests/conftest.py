import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    # One intra-op thread: on a shared 2-core machine a second thread that gets descheduled
    # makes every op wait (measured: mobilenet_v2 forward 1.8 s on 2 threads vs 0.01 s on 1).
    torch.set_num_threads(1)
