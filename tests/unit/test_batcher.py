import asyncio

import pytest

from tuneloop.serving.batcher import ComputeSlot, ContinuousBatcher, ItemFailed


def run(coro):
    return asyncio.run(coro)


def test_backlog_forms_the_next_batch():
    """While one batch computes, later requests queue; the next batch takes all of them."""
    sizes = []

    async def model(items):
        sizes.append(len(items))
        await asyncio.sleep(0.05)
        return [x * 2 for x in items]

    async def main():
        b = ContinuousBatcher(model, max_batch_size=32)
        first = asyncio.create_task(b.submit_many([0]))
        await asyncio.sleep(0.01)  # the first batch (one item) is now running
        rest = [asyncio.create_task(b.submit_many([i])) for i in range(1, 21)]
        return await first, await asyncio.gather(*rest)

    first, rest = run(main())
    assert first == [0] and [r[0] for r in rest] == [i * 2 for i in range(1, 21)]
    assert sizes == [1, 20]


def test_no_waiting_at_low_load():
    async def model(items):
        return items

    async def main():
        b = ContinuousBatcher(model, max_batch_size=32)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await b.submit_many(["a"])
        return loop.time() - t0

    assert run(main()) < 0.03  # no batching window waited (a loaded machine's scheduling aside)


def test_batches_respect_the_limit_and_keep_order():
    sizes = []

    async def model(items):
        sizes.append(len(items))
        await asyncio.sleep(0)
        return [f"r{x}" for x in items]

    async def main():
        b = ContinuousBatcher(model, max_batch_size=4)
        return await b.submit_many(list(range(10)))

    assert run(main()) == [f"r{i}" for i in range(10)]
    assert sizes == [4, 4, 2]


def test_an_error_every_item_hits_reaches_every_caller_and_the_loop_survives():
    broken = True

    async def model(items):
        if broken:
            raise ValueError("boom")
        return items

    async def main():
        nonlocal broken
        b = ContinuousBatcher(model, max_batch_size=8)
        calls = [asyncio.create_task(b.submit_many([1, 2])), asyncio.create_task(b.submit_many([3]))]
        for call in calls:
            with pytest.raises(ItemFailed) as failed:
                await call
            assert isinstance(failed.value.error, ValueError) and failed.value.index == 0
        broken = False
        return await b.submit_many([4])

    assert run(main()) == [4]


def test_one_bad_item_fails_alone_and_its_batch_mates_succeed():
    """A poisoned input co-batched with good ones: bisection finds it; only its request
    fails, naming its position, and every other request gets its own answer."""
    batches = []

    async def model(items):
        batches.append(list(items))
        if "bad" in items:
            raise ValueError("cannot tokenize")
        return [x.upper() for x in items]

    async def main():
        b = ContinuousBatcher(model, max_batch_size=32)
        blocker = asyncio.create_task(b.submit_many(["first"]))
        await asyncio.sleep(0)  # the first batch runs; the rest queue up behind it
        good = [asyncio.create_task(b.submit_many([f"g{i}", f"h{i}"])) for i in range(7)]
        poisoned = asyncio.create_task(b.submit_many(["ok", "bad"]))
        more = [asyncio.create_task(b.submit_many([f"m{i}"])) for i in range(6)]
        await blocker
        with pytest.raises(ItemFailed) as failed:
            await poisoned
        return failed.value, await asyncio.gather(*good), await asyncio.gather(*more)

    failed, good, more = run(main())
    assert failed.index == 1 and "cannot tokenize" in str(failed.error)
    assert good == [[f"G{i}", f"H{i}"] for i in range(7)] and more == [[f"M{i}"] for i in range(6)]
    assert len(batches[1]) == 22  # one batch held all of them, and failed
    assert ["bad"] in batches  # isolated down to the single bad item
    assert len(batches) <= 2 + 2 * 5  # bisection: about 2*log2(22) extra batches, not 22


def test_cancelled_items_are_skipped():
    seen = []

    async def model(items):
        seen.extend(items)
        await asyncio.sleep(0.05)
        return items

    async def main():
        b = ContinuousBatcher(model, max_batch_size=8)
        running = asyncio.create_task(b.submit_many(["first"]))
        await asyncio.sleep(0.01)
        doomed = asyncio.create_task(b.submit_many(["cancel-me"]))
        await asyncio.sleep(0)
        doomed.cancel()
        kept = await b.submit_many(["kept"])
        await running
        return kept

    assert run(main()) == ["kept"]
    assert "cancel-me" not in seen


def test_length_aware_batches_group_similar_lengths():
    batches = []

    async def model(items):
        batches.append(sorted(items))
        await asyncio.sleep(0.02)
        return items

    async def main():
        b = ContinuousBatcher(model, max_batch_size=3, length=len)
        first = asyncio.create_task(b.submit_many(["x"]))
        await asyncio.sleep(0.005)  # model busy: the next six queue up together
        texts = ["aa", "a" * 50, "bb", "b" * 52, "cc", "c" * 49]
        rest = await asyncio.gather(*(b.submit_many([t]) for t in texts))
        await first
        return rest

    rest = run(main())
    assert [r[0] for r in rest] == ["aa", "a" * 50, "bb", "b" * 52, "cc", "c" * 49]  # answers go to their askers
    assert batches[1] == ["aa", "bb", "cc"] and batches[2] == sorted(["a" * 50, "b" * 52, "c" * 49])


def test_on_batch_hears_each_items_queue_wait():
    waits: list[list[float]] = []

    async def model(items):
        await asyncio.sleep(0.05)
        return items

    async def main():
        b = ContinuousBatcher(model, max_batch_size=8, on_batch=waits.append)
        first = asyncio.create_task(b.submit_many([1]))
        await asyncio.sleep(0.01)
        await asyncio.gather(first, b.submit_many([2, 3]))

    run(main())
    assert [len(w) for w in waits] == [1, 2]
    assert waits[0][0] < 0.03  # the first item found the model free (the batch took 0.05 s)
    assert all(0.03 < w < 0.2 for w in waits[1])  # the others waited for the first batch


def test_batchers_sharing_a_compute_slot_choose_their_batch_only_when_it_is_free():
    """Production and a canary on one compute thread: production's batcher chose a batch of
    the one text queued while the canary's batch ran, then waited with it behind that batch;
    the texts arriving meanwhile waited a whole extra batch."""
    batches: list[tuple[str, list[int]]] = []
    slot = ComputeSlot()

    def runner(role):
        async def run(items):
            batches.append((role, list(items)))
            await asyncio.sleep(0.05)  # the one compute thread, busy
            return items
        return run

    async def scenario():
        canary = ContinuousBatcher(runner("canary"), max_batch_size=8, slot=lambda: slot)
        production = ContinuousBatcher(runner("production"), max_batch_size=8, slot=lambda: slot)
        first = asyncio.create_task(canary.submit_many([100]))
        await asyncio.sleep(0.01)  # the canary's batch is running
        waiting = [asyncio.create_task(production.submit_many([i])) for i in range(3)]
        for i in range(3, 6):  # arrivals while production waits for the slot
            await asyncio.sleep(0.01)
            waiting.append(asyncio.create_task(production.submit_many([i])))
        await asyncio.gather(first, *waiting)

    asyncio.run(scenario())
    assert batches == [("canary", [100]), ("production", [0, 1, 2, 3, 4, 5])]


def test_the_compute_slot_goes_to_the_batcher_whose_oldest_text_waited_longest():
    """A lock granted it in turns: past capacity a 5% canary got every other batch, and its
    latency looked far better than production's."""
    batches: list[str] = []
    slot = ComputeSlot()

    def runner(role):
        async def run(items):
            batches.append(role)
            await asyncio.sleep(0.01)
            return items
        return run

    async def scenario():
        production = ContinuousBatcher(runner("production"), max_batch_size=2, slot=lambda: slot)
        canary = ContinuousBatcher(runner("canary"), max_batch_size=2, slot=lambda: slot)
        backlog = [asyncio.create_task(production.submit_many([i])) for i in range(8)]  # 4 batches' worth
        await asyncio.sleep(0.005)  # production's first batch runs
        late = asyncio.create_task(canary.submit_many([100]))  # after all of production's texts
        await asyncio.gather(*backlog, late)

    asyncio.run(scenario())
    assert batches == ["production"] * 4 + ["canary"]  # a lock gave the canary the second batch

    async def cancelled_waiter():  # a waiter that gives up leaves the slot to the others
        slot = ComputeSlot()
        await slot.acquire(lambda: 0.0)
        gave_up = asyncio.create_task(slot.acquire(lambda: 1.0))
        stays = asyncio.create_task(slot.acquire(lambda: 2.0))
        await asyncio.sleep(0)
        gave_up.cancel()
        slot.release()  # before the cancelled task ran to take itself out: passed over
        await asyncio.wait_for(stays, 1)
        slot.release()
        await asyncio.wait_for(slot.acquire(lambda: 3.0), 1)  # free again

    asyncio.run(cancelled_waiter())


def test_a_failed_batch_whose_requests_gave_up_is_not_retried_in_halves():
    """A model failing every batch ran 2n-1 forward passes a batch of n, for requests that
    had timed out while the first one ran."""
    calls = []

    async def main():
        started, fail = asyncio.Event(), asyncio.Event()

        async def model(items):
            calls.append(len(items))
            if len(items) == 8:
                started.set()
                await fail.wait()  # held until the test has cancelled its requests
            raise RuntimeError("out of memory")

        b = ContinuousBatcher(model, max_batch_size=8)
        first = asyncio.create_task(b.submit_many(["blocker"]))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(b.submit_many([f"t{i}"])) for i in range(8)]
        await asyncio.wait_for(started.wait(), 5)  # the 8 run as one batch
        for task in waiting:
            task.cancel()  # their requests time out while it runs
        await asyncio.sleep(0)
        fail.set()
        await asyncio.sleep(0.1)
        with pytest.raises(ItemFailed):
            await first

    run(main())
    assert calls == [1, 8]  # the blocker, then the batch once: no halves for nobody
