"""The speed constants of extraction, in one place, with the measurement behind each.

Measured on the project machine: 2 Zen 4 cores (AVX-512, double-pumped), torch 2.x CPU,
R50 at 800x1066 (bench/extract_bench.py, README "Extraction speed"). None of them
changes results: each only decides how the same float32 arithmetic is scheduled.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class SpeedPolicy:
    # One image per forward on the CPU: batching did not pay there (oneDNN already fills
    # both cores at 800 px), and an unpadded image gives exactly the official numbers.
    cpu_batch_size: int = 1
    # Not measured yet (no GPU was lent): issue 15 section 1.
    gpu_batch_size: int = 16
    # Decoding threads. A FACET-sized JPEG (2000x1500 to 800x1066) takes ~33 CPU-ms to decode and
    # resize, and threads scale with the cores since PIL releases the GIL (1 -> 2 threads: 30 -> 61
    # images/s, README "Feeding a GPU"). On the CPU the model wants the cores, so at most 8; a GPU at
    # 200 images/s needs ~7 cores of decoding alone, so a GPU run takes every core but the one
    # feeding it (capped, for machines with very many cores).
    max_decode_workers: int = 8
    max_gpu_decode_workers: int = 32
    # Input shapes whose packed (oneDNN-blocked) R50 weights are kept, ~100 MB each: images
    # come sorted by aspect ratio, so a few shapes arrive in runs.
    packed_shapes: int = 3
    # Row count oneDNN blocks the transformer's reordered linear weights for (fastpath.PackedLinear):
    # the 850 tokens of an 800x1066 image, measured 5-10% faster than no hint or 1024 on the encoder's
    # products; it picks only the layout, any row count gives the same values.
    linear_rows_hint: int = 850
    # Torch threads of one CPU actor of a Ray run (extractor/ray_run.py): oneDNN already fills
    # two cores with one image at 800 px (see cpu_batch_size), so by default a node of C cores
    # gets C // 2 actors; asked for more actors, each gets its share of the cores (at least one).
    cpu_actor_threads: int = 2
    # glibc hands every allocation over 32 MB to mmap and back on free, so each forward faulted in
    # (zeroed) its ~50 MB activation maps afresh: at 800x1066 the stem conv took 31-133 ms that way
    # against 12 ms with the freed memory kept in the heap, the whole fused forward 0.62-0.66 s
    # against 0.49-0.55 s (median of 12), for +70-90 MB peak RSS (README "Extraction speed").
    keep_freed_memory: bool = True

    def batch_size(self, device: str) -> int:
        return self.gpu_batch_size if device.startswith("cuda") else self.cpu_batch_size

    def decode_workers(self, cores: int | None = None, device: str = "cpu") -> int:
        """Decoding threads for a process that owns ``cores`` cores (default: all of this machine's)
        and runs its model on ``device``."""
        cores = cores or os.cpu_count() or 1
        if device.startswith("cuda"):
            return max(1, min(self.max_gpu_decode_workers, cores - 1))
        return max(1, min(self.max_decode_workers, cores))

    def gpu_actor_cpus(self, node_cpus: int, node_gpus: int) -> int:
        """CPUs one single-GPU Ray actor reserves on a node of ``node_cpus`` cores and ``node_gpus``
        GPUs: its GPU's share of the cores, since it decodes its own images on them (decode_workers)."""
        return max(1, node_cpus // max(1, node_gpus))

    def cpu_actors(self, total_cpus: int, asked: int = 0) -> int:
        """How many CPU actors a Ray cluster of ``total_cpus`` cores runs (``asked`` 0 = auto)."""
        return max(1, asked or total_cpus // self.cpu_actor_threads)

    def actor_threads(self, total_cpus: int, node_cpus: int, actors: int) -> int:
        """Torch threads (= CPUs reserved) per CPU actor: the cores shared out, within one node."""
        return max(1, min(node_cpus, total_cpus // actors))


def keep_freed_memory(policy: SpeedPolicy) -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (no mmap, no trimming), where the policy
    says so and the C library is glibc; call before the model runs. True when it took effect."""
    if not policy.keep_freed_memory or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    ok = mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 1 << 30) == 1
    if not ok:
        logging.getLogger(__name__).info("mallopt refused: freed memory goes back to the OS")
    return ok


POLICY = SpeedPolicy()
