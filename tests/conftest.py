"""Shared pytest setup. DeepSpeed's CPU all-reduce leaves a ~66 MB /dev/shm buffer per rank when a run is
killed (the scripts remove theirs at a normal exit: release_shm_buffer); on a small CI machine the
SIGKILL tests would otherwise fill RAM. After each test, this removes such buffers of ours."""

import glob
import os

import pytest


@pytest.fixture(autouse=True)
def _remove_leaked_deepspeed_shm():
    yield
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"):
        try:
            os.remove(path)
        except OSError:
            pass
