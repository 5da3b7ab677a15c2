"""The speed constants of extraction, in one place, with the measurement behind each.

Measured on the project machine: 2 AVX-512 cores shared with other programs, torch 2.x
CPU, R50 at 800x1066 (bench/extract_bench.py, README "Extraction speed"). None of them
changes results: each only decides how the same float32 arithmetic is scheduled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class SpeedPolicy:
    # One image per forward on the CPU: batching did not pay there (oneDNN already fills
    # both cores at 800 px), and an unpadded image gives exactly the official numbers.
    cpu_batch_size: int = 1
    # Not measured yet (no GPU was lent): issue 15 section 1.
    gpu_batch_size: int = 16
    # Decoding threads: PIL releases the GIL; more than the cores only adds contention, and
    # past 8 a GPU is fed faster than its JPEGs arrive anyway.
    max_decode_workers: int = 8
    # Input shapes whose packed (oneDNN-blocked) R50 weights are kept, ~100 MB each: images
    # come sorted by aspect ratio, so a few shapes arrive in runs.
    packed_shapes: int = 3
    # Torch threads of one CPU actor of a Ray run (extractor/ray_run.py): oneDNN already fills
    # two cores with one image at 800 px (see cpu_batch_size), so by default a node of C cores
    # gets C // 2 actors; asked for more actors, each gets its share of the cores (at least one).
    cpu_actor_threads: int = 2

    def batch_size(self, device: str) -> int:
        return self.gpu_batch_size if device.startswith("cuda") else self.cpu_batch_size

    def decode_workers(self, cores: int | None = None) -> int:
        """Decoding threads for a process that owns ``cores`` cores (default: all of this machine's)."""
        return max(1, min(self.max_decode_workers, cores or os.cpu_count() or 1))

    def cpu_actors(self, total_cpus: int, asked: int = 0) -> int:
        """How many CPU actors a Ray cluster of ``total_cpus`` cores runs (``asked`` 0 = auto)."""
        return max(1, asked or total_cpus // self.cpu_actor_threads)

    def actor_threads(self, total_cpus: int, node_cpus: int, actors: int) -> int:
        """Torch threads (= CPUs reserved) per CPU actor: the cores shared out, within one node."""
        return max(1, min(node_cpus, total_cpus // actors))


POLICY = SpeedPolicy()
