"""Shared pytest fixtures and suite-wide settings."""

from __future__ import annotations

import os

# One intra-op thread unless the caller chose (scripts/test.sh sets it too; subprocesses inherit it): the suite's
# convolutions are small, and on a 2-CPU machine shared with anything else two OpenMP threads spin-wait for each
# other, which made the same training step 3-6x slower (measured) than one thread. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    # medtl3d.data.io drops MONAI's "nvImageCodec not available" notice at import, but pytest restores the warning
    # filters after collection, so the same filter (that notice only) is declared for the tests here.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:NvImgCodecPydicomReader. nvImageCodec decoder plugin did not register successfully:UserWarning")


@pytest.fixture
def one_thread():
    """Small convolutions run fastest single-threaded (and do not stall on a busy machine); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
