import pytest

from tuneloop.core.batching_policy import AIMDPolicy, next_batch_size, over_capacity, unit_seconds, work_units


def test_grows_additively_while_full_and_fast():
    p = AIMDPolicy(target_batch_latency_s=0.1, additive_step=4, max_batch_size=40)
    assert next_batch_size(p, 16, 16, 0.05) == 20
    assert next_batch_size(p, 38, 38, 0.05) == 40  # capped
    assert next_batch_size(p, 40, 40, 0.05) == 40


def test_partial_batches_leave_the_limit_alone():
    p = AIMDPolicy(target_batch_latency_s=0.1)
    assert next_batch_size(p, 32, 5, 0.01) == 32


def test_backs_off_multiplicatively_on_overrun():
    p = AIMDPolicy(target_batch_latency_s=0.1, backoff=0.5, min_batch_size=2)
    assert next_batch_size(p, 32, 32, 0.2) == 16
    assert next_batch_size(p, 3, 3, 0.2) == 2
    assert next_batch_size(p, 2, 2, 0.2) == 2  # floor
    p_mild = AIMDPolicy(target_batch_latency_s=0.1, backoff=0.99)
    assert next_batch_size(p_mild, 10, 10, 0.5) == 9  # always shrinks by at least one


def test_converges_under_a_linear_cost_model():
    """Latency = 2 ms + 1 ms per text against a 50 ms target: the limit settles near 48."""
    p = AIMDPolicy(target_batch_latency_s=0.050, additive_step=4, backoff=0.8, max_batch_size=256)
    limit, history = 8, []
    for _ in range(500):
        latency = 0.002 + 0.001 * limit
        limit = next_batch_size(p, limit, limit, latency)
        history.append(limit)
    tail = history[-100:]
    assert max(tail) <= 52 and min(tail) >= 36
    assert all(0.002 + 0.001 * x <= 0.056 for x in tail)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [({"target_batch_latency_s": 0}, "target_batch_latency_s must be > 0, got 0"),
     ({"target_batch_latency_s": 1, "min_batch_size": 5, "max_batch_size": 4}, "got 5, 4"),
     ({"target_batch_latency_s": 1, "backoff": 1.5}, "got 1.5"),
     ({"target_batch_latency_s": 1, "additive_step": 0}, "got 0")],
)
def test_invalid_policies_name_the_value(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        AIMDPolicy(**kwargs)


def test_select_batch_keeps_the_oldest_and_groups_by_length():
    from tuneloop.core.batching_policy import select_batch

    lengths = [10, 200, 12, 9, 180, 11, 50]
    assert select_batch(lengths, 4) == [0, 2, 3, 5]  # 10 with 12, 9, 11
    assert select_batch([200, *lengths], 2) == [0, 2]  # the oldest anchors, even when long
    assert select_batch(lengths[:4], 4) == [0, 1, 2, 3]  # only the lengths given are candidates
    assert select_batch([], 4) == []
    assert select_batch([5, 5, 5], 8) == [0, 1, 2]


def test_forward_passes_pad_each_pass_to_its_own_longest_row_where_a_pass_costs_less_than_the_padding():
    from tuneloop.core.batching_policy import forward_passes

    short_and_long = [5, 60, 5, 60, 5, 60, 5, 60]
    assert forward_passes(short_and_long, 64, pass_cost=64) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert forward_passes([20, 21, 19], 64, pass_cost=64) == [[0, 1, 2]]  # 2 tokens of padding: one pass
    assert forward_passes(short_and_long, 64, pass_cost=10_000) == [list(range(8))]
    assert forward_passes([7] * 10, 4, pass_cost=0) and all(len(p) <= 4 for p in forward_passes([7] * 10, 4))
    assert sorted(i for p in forward_passes([7] * 10, 4) for i in p) == list(range(10))
    assert forward_passes([], 8) == []
    with pytest.raises(ValueError, match="max_rows must be >= 1, got 0"):
        forward_passes([3], 0)


def test_forward_passes_cost_no_more_than_any_other_cut_of_the_rows_in_length_order():
    import itertools
    import random

    from tuneloop.core.batching_policy import forward_passes

    def cost(passes, lengths, pass_cost):
        return sum(len(p) * max(lengths[i] for i in p) + pass_cost for p in passes)

    rng = random.Random(3)
    for _ in range(200):
        lengths = [rng.randint(1, 80) for _ in range(rng.randint(1, 8))]
        max_rows, pass_cost = rng.randint(1, 8), rng.choice([0, 16, 64, 256])
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths, pass_cost)
                   for k in range(len(order))
                   for cuts in itertools.combinations(range(1, len(order)), k)
                   if all(b - a <= max_rows for a, b in zip((0, *cuts), (*cuts, len(order)))))
        passes = forward_passes(lengths, max_rows, pass_cost)
        assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
        assert all(len(p) <= max_rows for p in passes)
        assert cost(passes, lengths, pass_cost) == best


def test_work_is_counted_in_tokens_estimated_from_characters_and_cut_where_the_model_cuts():
    """Counted in texts, 64 texts of 2,000 characters were let in at short texts' cost and
    timed out, and 64 short ones refused after long ones."""
    assert work_units(["great film", "x" * 2000], 128) == (10 // 4 + 2) + 128
    assert work_units([], 128) == 0
    # a task that reads long texts in windows sharing 32 tokens: 502 tokens are 5 windows of 128
    assert work_units(["x" * 2000], 128, window_stride=32) == 128 * 5
    assert work_units(["great film"], 128, window_stride=32) == 10 // 4 + 2
    assert unit_seconds([]) is None  # nothing timed yet: nothing refused on a guess
    assert unit_seconds([(0.32, 320), (0.08, 160)]) == pytest.approx(0.4 / 480)  # weighed by work


def test_a_request_is_refused_when_its_work_or_the_queue_say_it_cannot_be_answered_in_time():
    assert over_capacity(0, 500_000, 0.1, 0.0, 30.0) is None  # an idle replica takes any request
    assert over_capacity(100, 64, 0.1, 0.0, 30.0) is None  # 16.4 s of work
    assert over_capacity(300, 64, 0.1, 0.0, 30.0) == "about 36s of work held"
    assert over_capacity(300, 64, None, 0.0, 30.0) is None  # no batch timed yet
    # the cost lags what queues now: the oldest queued text's wait says it
    assert over_capacity(300, 64, 0.001, 16.0, 30.0) == "its oldest queued text has waited 16.0s"
    assert over_capacity(300, 64, 0.001, 14.0, 30.0) is None
