"""EmbeddingDrift: reference and recent windows, bounded memory, cosine distance."""

from __future__ import annotations

import numpy as np
import pytest

from services.inference.quality import EmbeddingDrift


def _rows(vector: list[float], count: int) -> np.ndarray:
    return np.tile(np.asarray(vector, np.float32), (count, 1))


def test_no_drift_until_both_windows_are_full():
    drift = EmbeddingDrift(2, window=8, block=4)
    drift.add(_rows([1, 0], 8))  # the reference
    assert drift.drift() is None
    drift.add(_rows([1, 0], 7))  # one vector short of the recent window
    assert drift.drift() is None
    drift.add(_rows([1, 0], 1))
    assert drift.drift() == pytest.approx(0.0)


def test_drift_is_the_cosine_distance_between_the_window_means():
    drift = EmbeddingDrift(2, window=8, block=4)
    drift.add(_rows([1, 0], 8))
    drift.add(_rows([0, 1], 8))
    assert drift.drift() == pytest.approx(1.0)  # orthogonal means
    drift.add(_rows([1, 0], 4))  # half the recent window back to the reference's
    assert drift.drift() == pytest.approx(1 - 1 / np.sqrt(2))


def test_one_batch_can_fill_the_reference_and_start_the_recent_window():
    drift = EmbeddingDrift(2, window=8, block=4)
    drift.add(np.vstack([_rows([1, 0], 8), _rows([-1, 0], 8)]))
    assert drift.drift() == pytest.approx(2.0)  # opposite means


def test_memory_is_bounded_by_the_window():
    drift = EmbeddingDrift(3, window=8, block=4)
    for _ in range(100):
        drift.add(_rows([0, 0, 1], 5))
    assert len(drift._blocks) == 2
    assert drift.drift() == pytest.approx(0.0)


def test_window_must_be_whole_blocks():
    with pytest.raises(ValueError):
        EmbeddingDrift(2, window=10, block=4)
