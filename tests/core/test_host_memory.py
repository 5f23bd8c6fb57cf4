"""train.release_host_memory: CPU tensors of 4 MiB and more from mmap, so memory a step frees leaves the process
(glibc's heaps otherwise keep what is freed below a live block). benchmarks/host-memory.md has the training figures."""

import platform
import subprocess
import sys

import alignkit
from alignkit.engine import hostmemory
from helpers import fast

FRAGMENT = """
import os, sys, torch
from alignkit.engine import hostmemory
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page / 2**20
if sys.argv[1] == "on":
    assert hostmemory.mmap_large_tensors()
torch.ones(4 << 20).sum()  # a freed 16 MiB block: glibc's threshold rises above the 8 MiB blocks below
base, freed, kept = rss(), [], []
for _ in range(40):  # 40 x 8 MiB freed, each under a small tensor that stays (a layer's checkpointed input)
    freed.append(torch.ones(2 << 20))
    kept.append(torch.ones(64 << 10))
del freed
print(rss() - base)
"""

def resident_after_freeing(setting: str) -> float:
    out = subprocess.run([sys.executable, "-c", FRAGMENT, setting], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


def test_freed_tensors_below_a_live_one_leave_the_process():
    kept = resident_after_freeing("off")
    released = resident_after_freeing("on")
    assert kept > 250  # 320 MiB freed, most of it still resident
    assert released < 40  # the 10 MiB that stay, and little else


def test_a_run_sets_it_unless_told_not_to(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hostmemory, "mmap_large_tensors", lambda: calls.append(1) or True)
    alignkit.run("orpo", fast(tmp_path / "on"))
    assert calls == [1]
    alignkit.run("orpo", fast(tmp_path / "off", release_host_memory=False))
    assert calls == [1]


def test_elsewhere_it_changes_nothing(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert hostmemory.mmap_large_tensors() is False
