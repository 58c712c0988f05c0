"""The replay policy's arithmetic: kept-back rows, quotas, stratified samples and the
reservoir. Pure; milliseconds."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tuneloop.core.replay import kept_back, replay_quota, reservoir_update, stratified_sample


def test_kept_back_and_quota():
    assert [kept_back(n, 0.2) for n in (0, 4, 5, 200)] == [0, 0, 1, 40]
    with pytest.raises(ValueError):
        kept_back(10, 1.0)
    assert replay_quota(160, 1.0, 10_000) == 160
    assert replay_quota(160, 3.0, 400) == 240  # the budget caps replay, never fresh rows
    assert replay_quota(500, 1.0, 400) == 0


def test_stratified_sample_keeps_label_shares_and_every_label():
    labels = ["a"] * 900 + ["b"] * 90 + ["c"] * 10
    picked = stratified_sample(labels, 100, random.Random(0))
    assert len(picked) == 100 == len(set(picked))
    assert Counter(labels[i] for i in picked) == {"a": 90, "b": 9, "c": 1}
    rare = stratified_sample(["a"] * 999 + ["b"], 10, random.Random(0))
    assert Counter(("a" if i < 999 else "b") for i in rare) == {"a": 9, "b": 1}
    assert stratified_sample(labels, 5000, random.Random(0)) == list(range(1000))
    assert stratified_sample(labels, 0, random.Random(0)) == []
    assert stratified_sample(labels, 100, random.Random(1)) != picked  # seeded, not fixed


def test_stratified_sample_gives_leftover_slots_to_drawn_labels_not_always_the_same():
    """4 slots among 12 intents of 25 rows: by largest remainder, ties by name, the same 4
    intents were replayed by every job and the other 8 never."""
    labels = [f"intent{j:02d}" for j in range(12) for _ in range(25)]
    hits = Counter()
    for seed in range(600):
        picked = stratified_sample(labels, 4, random.Random(seed))
        assert len(picked) == 4 == len({labels[i] for i in picked})  # 4 labels, one row each
        hits.update(labels[i] for i in picked)
    assert set(hits) == set(labels) and min(hits.values()) > 140  # each 200 expected
    # unequal remainders: a label's expected count is its share (a's 4.4 of 8, c's 1.6), where
    # the largest remainder gave c its 2 and a its 4 every time
    labels = ["a"] * 55 + ["b"] * 25 + ["c"] * 20
    counts = Counter(labels[i] for seed in range(2000) for i in stratified_sample(labels, 8, random.Random(seed)))
    assert abs(counts["a"] / 2000 - 4.4) < 0.05 and abs(counts["c"] / 2000 - 1.6) < 0.05 and counts["b"] == 4000
    # several leftover slots: each label drawn with the chance of the share it lacks
    labels = ["a"] * 19 + ["b"] * 19 + ["c"] * 11 + ["d"] * 11  # k=10: shares 3.17, 3.17, 1.83, 1.83
    counts = Counter(labels[i] for seed in range(4000) for i in stratified_sample(labels, 10, random.Random(seed)))
    assert all(abs(counts[x] / 4000 - share) < 0.03 for x, share in zip("abcd", (19 / 6, 19 / 6, 11 / 6, 11 / 6)))
    # the one each label is owed takes the sample past k: no leftover slot is drawn, the excess
    # is taken back from the largest (a slice by a negative count handed out most of them)
    labels = ["A"] * 60 + ["B"] * 12 + ["C"] * 12 + ["D"] * 12 + ["e1", "e2", "e3", "e4"]
    counts = Counter(labels[i] for seed in range(200) for i in stratified_sample(labels, 12, random.Random(seed)))
    assert counts["A"] == 200 * 5 and all(counts[x] == 200 for x in ("B", "C", "D", "e1", "e4"))


def test_reservoir_is_bounded_and_uniform_over_all_history():
    rng = random.Random(7)
    hits = Counter()
    for _ in range(2000):
        reservoir, seen = [], 0
        for batch in range(10):  # ten jobs of 20 fresh rows each
            reservoir, seen = reservoir_update(reservoir, seen, [batch * 20 + i for i in range(20)], 50, rng)
        assert len(reservoir) == 50 and seen == 200
        hits.update(x // 20 for x in reservoir)
    # Each job's rows make up a tenth of the reservoir on average: old ones are not forgotten.
    assert all(abs(hits[b] / (2000 * 50) - 0.1) < 0.01 for b in range(10))


def test_rows_taken_out_of_the_reservoir_leave_slots_the_next_rows_compete_for():
    """A newer answer or a golden text takes rows out between jobs: the next job's first
    rows filled those gaps every time (52% kept against 1.3% for the rest)."""
    rng = random.Random(11)
    first, rest, trials = 0, 0, 3000
    for _ in range(trials):
        reservoir, seen = reservoir_update([], 0, list(range(1000)), 100, rng)
        reservoir = reservoir[5:]  # five replaced since
        reservoir, seen = reservoir_update(reservoir, seen, [f"new {i}" for i in range(100)], 100, rng)
        kept = {x for x in reservoir if isinstance(x, str)}
        first += sum(f"new {i}" in kept for i in range(5))
        rest += sum(f"new {i}" in kept for i in range(5, 100))
        assert len(reservoir) <= 100 and seen == 1100
    # Each new row's chance is 100/1100 (9%), the first five's as the others'.
    assert abs(first / (5 * trials) - 100 / 1100) < 0.02 and abs(rest / (95 * trials) - 100 / 1100) < 0.01


def test_a_lowered_reservoir_size_shrinks_the_reservoir_and_keeps_it_uniform():
    rng = random.Random(3)
    hits = Counter()
    for _ in range(2000):
        reservoir, seen = reservoir_update([], 0, list(range(100)), 100, rng)  # the old size: 100
        reservoir, seen = reservoir_update(reservoir, seen, list(range(100, 200)), 20, rng)  # lowered to 20
        assert len(reservoir) == 20 and seen == 200
        hits.update(x // 100 for x in reservoir)
    assert abs(hits[1] / (2000 * 20) - 0.5) < 0.02  # the new rows are half of what was seen, and of the sample
    assert reservoir_update(list(range(10)), 10, [10, 11], 0, rng)[0] == []


def test_training_shortfall_says_what_to_change():
    from tuneloop.core.resources import training_shortfall

    cpu = {"CPU": 1}
    assert training_shortfall(2, cpu, {"CPU": 6}, {"CPU": 5}) is None
    short = training_shortfall(2, cpu, {"CPU": 2}, {"CPU": 2})
    assert "needs 3 CPUs" in short and "has 2" in short and "ray.num_cpus" in short
    busy = training_shortfall(2, cpu, {"CPU": 4}, {"CPU": 1})
    assert "only 1 of 4 are free" in busy and "max_replicas" in busy
    assert "needs 5 CPUs" in training_shortfall(2, {"CPU": 2}, {"CPU": 4}, {"CPU": 4})  # cpus_per_worker counts
    # One GPU: a replica holds half of it. Two whole-GPU workers never fit; one worker with
    # the other half does; a worker asking for a whole GPU waits for the replica's half.
    one_gpu, half_free = {"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 0.5}
    assert "needs 2 GPUs" in training_shortfall(2, {"CPU": 1, "GPU": 1}, one_gpu, half_free)
    assert training_shortfall(1, {"CPU": 1, "GPU": 0.5}, one_gpu, half_free) is None
    assert "free GPUs" in training_shortfall(1, {"CPU": 1, "GPU": 1}, one_gpu, half_free)
    # A custom resource no node offers: Ray Train would wait for it forever.
    assert "offers 0" in training_shortfall(2, {"CPU": 1, "training-node": 1}, {"CPU": 8}, {"CPU": 8})


def test_a_local_ray_left_unsized_fits_the_replicas_and_a_job_and_a_small_one_is_refused():
    from tuneloop.core.config import parse_config
    from tuneloop.core.resources import local_ray_cpus, retraining_shortfall

    # One model on 2 cores: a replica of 1 CPU and a job of 2 workers + 1 need 4 of Ray's.
    assert local_ray_cpus(2, 1, 1, 1.0, 3.0) == 4
    assert local_ray_cpus(16, 1, 1, 1.0, 3.0) == 16  # the cores, where they are more
    assert local_ray_cpus(2, 3, 1, 2.0, 3.0) == 9  # the shipped config's 9
    cfg = parse_config({"models": [{"name": "m", "labels": ["a", "b"], "training": {"num_workers": 4}},
                                   {"name": "n", "labels": ["a", "b"]}]})
    assert cfg.largest_job_cpus() == 5.0  # m's own num_workers, not the top-level 2
    assert retraining_shortfall(1, 1, 1.0, 3.0, 4.0) is None
    short = retraining_shortfall(1, 2, 1.0, 3.0, 4.0)  # num_replicas 2 on ray.num_cpus 4
    assert "needs 3 CPUs beside the replicas' 2" in short and "raise ray.num_cpus to 5" in short


def test_gpu_replicas_holding_every_gpu_a_job_needs_are_refused_at_start():
    from tuneloop.core.config import parse_config
    from tuneloop.core.resources import gpu_retraining_shortfall

    cfg = parse_config({"models": [{"name": "m", "labels": ["a", "b"], "training": {"use_gpu": True}},
                                   {"name": "n", "labels": ["a", "b"]}],
                        "training": {"num_workers": 1}})
    assert cfg.largest_job_gpus() == 1.0
    short = gpu_retraining_shortfall(2, 1, 1.0, cfg.largest_job_gpus(), 2.0)  # two models' replicas on 2 GPUs
    assert "needs 1 GPU(s) beside the replicas' 2" in short
    assert gpu_retraining_shortfall(2, 1, 0.5, 1.0, 2.0) is None  # replicas sharing a GPU leave one
    # No GPU at all: no count of GPUs to lower helps, and the message says what does.
    assert "Ray sees no GPU on this machine: set training.use_gpu: false" in gpu_retraining_shortfall(1, 1, 0, 1.0, 0)
    assert gpu_retraining_shortfall(1, 1, 0.0, 0.0, 0.0) is None  # CPUs only


def test_several_gpu_workers_take_whole_gpus():
    from tuneloop.core.config import ConfigError, parse_config

    model = {"name": "m", "base_model": "b", "labels": ["a", "b"]}
    with pytest.raises(ConfigError, match="gpus_per_worker 0.5 with num_workers 2.*NCCL refuses"):
        parse_config({"models": [model], "training": {"use_gpu": True, "gpus_per_worker": 0.5}})
    one = parse_config({"models": [model], "training": {"use_gpu": True, "num_workers": 1, "gpus_per_worker": 0.5}})
    assert one.training.gpus_per_worker == 0.5


def test_serving_shortfall_names_what_no_node_can_hold():
    from tuneloop.core.config import parse_config
    from tuneloop.core.resources import serving_shortfall

    cpu = {"CPU": 2.0, "GPU": 0.0}
    assert serving_shortfall(3, 1, cpu, {"CPU": 9}) is None  # the shipped config on its local Ray
    short = serving_shortfall(3, 1, {"CPU": 4.0, "GPU": 0.0}, {"CPU": 9})
    assert "serving needs 12 CPU (3 model(s) x 1 replica(s) x 4, serving.num_cpus_per_replica)" in short
    assert "has 9" in short and "ray.num_cpus" in short
    gpu = serving_shortfall(1, 2, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 8})
    assert "serving needs 2 GPU" in gpu and "serving.num_gpus_per_replica" in gpu and "add nodes" in gpu
    assert "serving.resources_per_replica" in serving_shortfall(1, 1, {"CPU": 1.0, "serving-node": 1.0}, {"CPU": 8})
    # The config's defaults fit a one-core machine.
    s = parse_config({"models": [{"name": "m", "base_model": "b", "labels": ["a", "b"]}]}).serving
    assert serving_shortfall(1, s.autoscaling.min_replicas, {"CPU": s.num_cpus_per_replica}, {"CPU": 1}) is None
