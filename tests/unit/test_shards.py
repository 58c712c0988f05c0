import pyarrow as pa
import pytest

from tuneloop.training.recipe import worker_rows
from tuneloop.training.shards import batches, epoch_batches, worker_shard


def _table(n: int) -> pa.Table:
    return pa.table({"i": list(range(n)), "tags": [[i, i + 1] for i in range(n)]})


def _order(shard: pa.Table, epoch: int, rank: int = 0, world: int = 2, seed: int = 0) -> list[int]:
    return [i for batch in epoch_batches(shard, epoch, 8, seed=seed, rank=rank, world=world) for i in batch["i"]]


def test_each_epoch_after_the_first_reshuffles_the_shard():
    shard = _table(40)
    assert _order(shard, 0) == list(range(40))  # the job's own (already shuffled) order
    epochs = [_order(shard, e) for e in (1, 2)]
    for seen in epochs:
        assert sorted(seen) == list(range(40)) and seen != list(range(40))
    assert epochs[0] != epochs[1]  # a new order every epoch...
    assert _order(shard, 1) == epochs[0]  # ...that a rerun repeats
    assert _order(shard, 1, rank=1) != epochs[0]  # each worker its own
    assert _order(shard, 1, seed=1) != epochs[0]  # and each job seed


def test_workers_get_equal_shares_of_every_row():
    table = _table(43)
    shares = [worker_shard(table, rank, 3)["i"].to_pylist() for rank in range(3)]
    assert [len(s) for s in shares] == [15, 15, 15] == [worker_rows(43, 3)] * 3
    assert sorted(sum(shares, [])) == sorted(list(range(43)) + [0, 1])  # the last share wraps to the first rows
    shares = [worker_shard(_table(5), rank, 4)["i"].to_pylist() for rank in range(4)]
    assert shares == [[0, 1], [2, 3], [4, 0], [1, 2]]  # every row trains, none left out
    assert worker_shard(table, 0, 1).num_rows == 43  # one worker: every row
    with pytest.raises(ValueError, match="rank 3"):
        worker_shard(table, 3, 3)


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
