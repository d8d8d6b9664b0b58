"""Shared pytest setup. DeepSpeed's CPU all-reduce leaves a ~66 MB /dev/shm buffer per rank when a
run is killed (the scripts remove theirs at a normal exit); on a small machine the kill tests would
otherwise fill its memory. After each test this removes the buffers of this session's own runs (by
their master ports) and nobody else's."""

import glob
import os

import pytest
from harness import PORTS, STARTS


@pytest.fixture(autouse=True)
def _remove_our_shm_buffers():
    yield
    for port in PORTS:
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
            try:
                os.remove(path)
            except OSError:
                pass


def pytest_terminal_summary(terminalreporter):
    """How many processes the suite started, and how many runs they held: the suite's main cost."""
    if STARTS:
        runs = sum(r for _, _, r in STARTS)
        kinds = sorted({f"{launcher} x{ranks}" for launcher, ranks, _ in STARTS})
        terminalreporter.write_line(f"launches: {len(STARTS)} ({', '.join(kinds)}), holding {runs} runs")
