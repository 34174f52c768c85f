"""An endless, seeded, resumable stream of training prompts (epoch after epoch, reshuffled each epoch)."""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence


class PromptStream:
    """Yields ``(index, row)`` pairs of ``rows``; the order of epoch ``e`` is a permutation seeded by ``(seed, e)``.

    Its state is two integers, so a checkpoint restores the exact position.
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]], seed: int, shuffle: bool = True) -> None:
        if not rows:
            raise ValueError("the training set is empty")
        self.rows = rows
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(f"{self.seed}/epoch/{epoch}").shuffle(order)
        return order

    def next_batch(self, size: int) -> list[tuple[int, Mapping[str, Any]]]:
        """The next ``size`` prompts, crossing into the next epoch when this one runs out."""
        out = []
        while len(out) < size:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            index = self._order[self.position]
            out.append((index, self.rows[index]))
            self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)
