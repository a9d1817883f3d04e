"""umgr.arrays: the sort-based stand-ins for np.unique (pure logic)."""

import numpy as np
import pytest

from umgr.arrays import union, unique


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.uint64])
def test_unique_is_np_unique(dtype):
    rng = np.random.default_rng(5)
    for size in (0, 1, 2, 3, 17, 512, 10_000):
        values = rng.integers(0, max(2, size // 3), size).astype(dtype)
        got = unique(values)
        assert got.dtype == dtype and got.tolist() == np.unique(values).tolist()


def test_unique_leaves_its_input_alone_and_flattens():
    values = np.array([[3, 1], [3, 2]], np.int64)
    assert unique(values).tolist() == [1, 2, 3]
    assert values.tolist() == [[3, 1], [3, 2]]


def test_union_is_np_union1d():
    these, those = np.array([9, 1, 1, 4], np.int64), np.array([4, 0, 12], np.int64)
    assert union(these, those).tolist() == np.union1d(these, those).tolist() == [0, 1, 4, 9, 12]
    assert union(np.empty(0, np.int64), those).tolist() == [0, 4, 12]


def test_unique_counts_is_np_uniques_answer():
    from umgr.arrays import unique_counts
    rng = np.random.default_rng(5)
    for size in (0, 1, 2, 17, 600):
        values = rng.integers(0, 40, size).astype(np.int32)
        got, times = unique_counts(values)
        want, want_times = np.unique(values, return_counts=True)
        assert got.tolist() == want.tolist() and times.tolist() == want_times.tolist()
