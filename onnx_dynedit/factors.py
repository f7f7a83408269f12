"""Key statistics kept on disk between uses when they are large.

A round computes the key statistics of every candidate layer, then reads them one layer
at a time (the localisation's edit directions), and keeps them for the next round (an
edit of layer L changes only the statistics of layers after L). Held in memory, a
VGG-16's factors take 0.6 GB through the whole edit, fits and checks included. When
the factors of a round exceed SPILL_BYTES, ``FactorStore`` writes each one to a
temporary folder (torch.save) and reads it back on every use, so that one layer's
factor is in memory at a time; smaller ones stay in memory as they are (the sample
models never touch the disk). The folder is removed by ``close`` (``rectify`` calls it
in a ``finally``).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .rank_one import KeyStats

SPILL_BYTES = 256 * 2**20  # factors of a round above this total go to disk


class FactorStore(Mapping):
    """node -> KeyStats; large sets of factors live in a temporary folder."""

    def __init__(self, budget: int = SPILL_BYTES):
        self.budget = budget
        self._memory: dict[str, KeyStats] = {}
        self._disk: dict[str, tuple[KeyStats, Path, torch.device]] = {}
        self._folder: tempfile.TemporaryDirectory | None = None
        self._written = 0

    def update(self, stats: dict[str, KeyStats]) -> None:
        """Add ``stats`` (used up); spill every factor in memory when they exceed the budget."""
        self._memory.update(stats)
        stats.clear()
        if sum(s.chol.numel() * s.chol.element_size() for s in self._memory.values()) <= self.budget:
            return
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="dynedit-factors-")
        for node, s in self._memory.items():
            if node in self._disk:  # recomputed after an edit: the old file goes
                self._disk.pop(node)[1].unlink(missing_ok=True)
            path = Path(self._folder.name) / f"{self._written}.pt"
            self._written += 1
            torch.save(s.chol.cpu(), path)
            self._disk[node] = (dataclasses.replace(s, chol=torch.empty(0)), path, s.chol.device)
        self._memory.clear()

    def __getitem__(self, node: str) -> KeyStats:
        if node in self._memory:
            return self._memory[node]
        meta, path, device = self._disk[node]
        return dataclasses.replace(meta, chol=torch.load(path, weights_only=True).to(device))

    def discard(self, node: str) -> None:
        """Forget ``node``'s statistics (in memory or on disk)."""
        self._memory.pop(node, None)
        if node in self._disk:
            self._disk.pop(node)[1].unlink(missing_ok=True)

    def __iter__(self):
        yield from self._memory
        yield from self._disk

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    def __contains__(self, node) -> bool:
        return node in self._memory or node in self._disk

    def close(self) -> None:
        self._memory.clear()
        self._disk.clear()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None
