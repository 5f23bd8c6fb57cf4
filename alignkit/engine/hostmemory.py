"""Host (CPU) memory: tensors of 4 MiB and more from mmap, so that what a step frees goes back to the OS at once.

glibc serves an allocation below its mmap threshold (which rises with the blocks freed, up to 32 MiB) from a heap,
and a heap gives memory back only above its highest live block. A training step frees its activations layer by
layer while the tensors it keeps (each layer's checkpointed input, the gradients as backward makes them) sit above
them, so the freed memory stays resident and the next allocations land above it: at Qwen2-0.5B's width with
gradient checkpointing, about 90 MB a layer in the first step's forward, over 2 GB at 24 layers, never used
again. With a fixed threshold of 4 MiB (`mallopt(M_MMAP_THRESHOLD)`, which also stops the threshold rising), such
tensors are mapped and unmapped on their own and the resident peak follows the live tensors; the price is the page
faults of fresh mappings (a few percent of a CPU step, benchmarks/host-memory.md).

Process-wide and kept after the run (the allocator has no undo for it); `train.release_host_memory=false` leaves
the allocator as it is. Linux with glibc only; elsewhere nothing changes.
"""

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc malloc.h
THRESHOLD = 4 << 20


def mmap_large_tensors(threshold: int = THRESHOLD) -> bool:
    """Set glibc's mmap threshold to `threshold` bytes; True when it took (Linux with glibc)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
    if not done:
        log.warning("glibc refused mallopt(M_MMAP_THRESHOLD, %d); the allocator is left as it was", threshold)
    return done
