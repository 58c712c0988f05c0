import pyarrow as pa
import pytest

from tuneloop.training.recipe import worker_rows
from tuneloop.training.shards import batches, epoch_batches, epoch_rows


def _table(n: int) -> pa.Table:
    return pa.table({"i": list(range(n)), "tags": [[i, i + 1] for i in range(n)]})


def _order(table: pa.Table, epoch: int, rank: int = 0, world: int = 2, seed: int = 0) -> list[int]:
    return [i for batch in epoch_batches(table, epoch, 8, seed=seed, rank=rank, world=world) for i in batch["i"]]


def test_each_epoch_after_the_first_reshuffles_every_row_among_the_workers():
    """Each worker shuffled its own share alone: a row never moved to another worker, and
    the rows that wrapped around trained twice in every epoch."""
    table = _table(40)
    assert _order(table, 0) == list(range(20)) and _order(table, 0, rank=1) == list(range(20, 40))  # the job's order
    epochs = [_order(table, e) + _order(table, e, rank=1) for e in (1, 2)]
    for seen in epochs:
        assert sorted(seen) == list(range(40)) and seen != list(range(40))  # every row once, among both
    assert set(epochs[0][:20]) != set(range(20))  # rows moved between the workers
    assert epochs[0] != epochs[1]  # a new order every epoch...
    assert _order(table, 1) == epochs[0][:20]  # ...that a rerun repeats
    assert _order(table, 1, seed=1) != epochs[0][:20]  # and each job seed its own
    sizes = [len(b["i"]) for b in epoch_batches(table, 1, 8, seed=0, rank=0, world=2)]
    assert sizes == [8, 8, 4]  # the worker's 20 rows, no empty batch past them


def test_workers_get_equal_shares_of_every_row():
    shares = [epoch_rows(43, 0, 0, rank, 3).tolist() for rank in range(3)]
    assert [len(s) for s in shares] == [15, 15, 15] == [worker_rows(43, 3)] * 3
    assert sorted(sum(shares, [])) == sorted(list(range(43)) + [0, 1])  # the last share wraps to the first rows
    shares = [epoch_rows(5, 0, 0, rank, 4).tolist() for rank in range(4)]
    assert shares == [[0, 1], [2, 3], [4, 0], [1, 2]]  # every row trains, none left out
    assert len(epoch_rows(43, 0, 0, 0, 1)) == 43  # one worker: every row
    wrapped = [epoch_rows(43, epoch, 0, 2, 3)[-2:].tolist() for epoch in (1, 2)]
    assert wrapped[0] != wrapped[1]  # the rows trained twice change with the epoch
    with pytest.raises(ValueError, match="rank 3"):
        epoch_rows(43, 0, 0, 3, 3)


def test_batches_are_python_lists_with_a_short_last_one():
    out = list(batches(_table(10), 4))
    assert [len(b["i"]) for b in out] == [4, 4, 2]
    assert out[0] == {"i": [0, 1, 2, 3], "tags": [[0, 1], [1, 2], [2, 3], [3, 4]]}
    assert list(batches(_table(0), 4)) == []
    with pytest.raises(ValueError, match="at least 1, not 0"):
        next(batches(_table(3), 0))


def test_length_grouped_batches_hold_rows_of_one_length_in_a_new_order_every_epoch():
    import numpy as np

    from tuneloop.training.shards import length_grouped

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 64, size=1003)
    order = rng.permutation(1003)
    grouped = length_grouped(order, lengths, 8, np.random.default_rng(1), window=10)
    assert sorted(grouped.tolist()) == list(range(1003))  # every row once
    batches_ = [grouped[i:i + 8] for i in range(0, 1003, 8)]
    assert len(batches_[-1]) == 3 and set(batches_[-1]) <= set(order[960:])  # short one last, of the last window
    padded = sum(lengths[b].max() * len(b) for b in batches_)
    random_padded = sum(lengths[order[i:i + 8]].max() * len(order[i:i + 8]) for i in range(0, 1003, 8))
    assert padded < 0.7 * random_padded  # little padding: each window's rows sorted by length
    # The batches' order is shuffled, not longest first, and differs with the generator.
    firsts = [lengths[b].max() for b in batches_[:-1]]
    assert firsts != sorted(firsts, reverse=True)
    assert length_grouped(order, lengths, 8, np.random.default_rng(2), window=10).tolist() != grouped.tolist()
    assert length_grouped(order[:0], lengths, 8, rng).tolist() == []


def test_epoch_batches_group_by_the_lengths_given_and_keep_every_row():
    import numpy as np

    shard = _table(40)
    lengths = np.array([i % 5 for i in range(40)])
    for epoch in (0, 1):
        seen = [batch["i"] for batch in epoch_batches(shard, epoch, 8, seed=0, rank=0, world=1, lengths=lengths)]
        assert sorted(sum(seen, [])) == list(range(40))
        assert all(len({lengths[i] for i in batch}) == 1 for batch in seen)  # 8 rows of each length
