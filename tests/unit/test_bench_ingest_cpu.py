"""bench_ingest's CPU accounting counts the benchmark's processes only: on a shared
machine every other process's CPU would be charged to the transactions."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from benchmarks.bench_ingest import _cpu_seconds


@pytest.fixture
def child_and_stranger():
    """A child of this process, and a process that is not its descendant (its
    parent shell exits, so it is re-parented), both killed at the end."""
    child = subprocess.Popen(["sleep", "60"])
    out = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                         check=True)
    stranger = int(out.stdout.strip())
    try:
        yield child.pid, stranger
    finally:
        child.kill()
        child.wait()
        try:
            os.kill(stranger, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_counts_descendants_and_named_servers_but_not_other_processes(child_and_stranger):
    child, stranger = child_and_stranger
    ours = _cpu_seconds([])
    assert os.getpid() in ours and child in ours
    assert stranger not in ours
    assert stranger in _cpu_seconds([stranger])  # a server named by pid counts, with its children
