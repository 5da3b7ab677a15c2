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

    def batch_size(self, device: str) -> int:
        return self.gpu_batch_size if device.startswith("cuda") else self.cpu_batch_size

    def decode_workers(self) -> int:
        return min(self.max_decode_workers, os.cpu_count() or 1)


POLICY = SpeedPolicy()
