"""The allocator setting of a serving process (`worker/engine/host_memory.py`)."""
import ctypes.util
import resource
import sys

import pytest
import torch

from worker.engine import host_memory

glibc = pytest.mark.skipif(not sys.platform.startswith("linux")
                           or ctypes.util.find_library("c") is None,
                           reason="glibc's mallopt is a Linux C library's")


@glibc
def test_a_freed_temporary_is_reused_without_fresh_pages():
    """Once set, a 12 MB tensor made and freed again and again (a prefill's projection)
    reuses the freed pages: a fresh mapping each time would fault in every one of its 3,072
    pages each time."""
    assert host_memory.keep_freed_memory() is True
    assert host_memory.keep_freed_memory() is True  # once a process; the answer stays
    pages = 12 * 1024 * 1024 // resource.getpagesize()
    for _ in range(2):  # the heap grows to hold it once
        torch.empty(12 * 1024 * 1024, dtype=torch.uint8).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(12 * 1024 * 1024, dtype=torch.uint8).fill_(1)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 2 * pages, faults  # 20 fresh mappings: 20 x pages


def test_without_a_c_library_nothing_is_set(monkeypatch):
    def missing(name):
        raise OSError(f"{name}: not found")
    monkeypatch.setattr(host_memory.ctypes, "CDLL", missing)
    assert host_memory._mallopt(host_memory.M_MMAP_THRESHOLD, 1 << 20) is False
