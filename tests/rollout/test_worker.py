"""The server's engine worker in-process: a failed engine step fails only the requests it was running."""

import asyncio

import pytest

from r3rl.models.presets import make_model
from r3rl.rollout import EngineRequest, RolloutEngine, SamplingParams
from r3rl.rollout.worker import (
    MAX_STEP_FAILURES,
    EngineStepFailed,
    EngineUnavailable,
    EngineWorker,
    RequestAborted,
)


def _req(rid):
    return EngineRequest(request_id=rid, input_ids=[1, 2, 3], sampling=SamplingParams(max_new_tokens=3, seed=0))


def _flaky(engine, failing_steps):
    real_step, calls = engine.step, {"n": 0}

    def step():
        calls["n"] += 1
        if calls["n"] <= failing_steps:
            raise RuntimeError(f"injected step failure {calls['n']}")
        return real_step()

    engine.step = step


def test_one_failed_step_fails_its_requests_and_the_worker_recovers():
    engine = RolloutEngine(make_model("tiny-qwen3-moe"), max_slots=4, max_seq_len=32)
    _flaky(engine, failing_steps=1)

    async def run():
        worker = EngineWorker(engine)
        worker.start()
        try:
            with pytest.raises(EngineStepFailed, match="injected step failure 1"):
                await worker.submit(_req("a"))
            out = await worker.submit(_req("a"))  # the same id again: the engine forgot the aborted request
            return out, worker.alive
        finally:
            worker.stop(10)

    out, alive = asyncio.run(run())
    assert len(out.output_ids) == 3 and alive


def test_a_persistent_fault_marks_the_worker_dead():
    engine = RolloutEngine(make_model("tiny-qwen3-moe"), max_slots=4, max_seq_len=32)
    _flaky(engine, failing_steps=10**6)

    async def run():
        worker = EngineWorker(engine)
        worker.start()
        for i in range(MAX_STEP_FAILURES):
            with pytest.raises(EngineStepFailed):
                await worker.submit(_req(str(i)))
        await asyncio.sleep(0.2)
        alive = worker.alive
        with pytest.raises(EngineUnavailable, match="not accepting requests"):
            worker.submit(_req("late"))
        worker.stop(10)
        return alive

    assert asyncio.run(run()) is False


def test_abort_all_empties_the_engine():
    engine = RolloutEngine(make_model("tiny-qwen3-moe"), max_slots=1, max_seq_len=32)
    for rid in "abc":
        engine.add_request(_req(rid))
    engine.step()  # one running, two waiting
    assert sorted(engine.abort_all()) == ["a", "b", "c"] and not engine.has_work()
    assert engine.generate([_req("a")])[0].output_ids  # ids and slots are free again


def test_requests_lost_by_the_engine_fail_and_mark_the_worker_dead():
    engine = RolloutEngine(make_model("tiny-qwen3-moe"), max_slots=4, max_seq_len=32)
    real_step = engine.step

    def forgetful_step():  # a scheduler bug: the engine drops its requests without returning them
        real_step()
        engine.abort_all()
        return []

    engine.step = forgetful_step

    async def run():
        worker = EngineWorker(engine)
        worker.start()
        with pytest.raises(EngineStepFailed, match="lost by the engine"):
            await worker.submit(_req("a"))
        await asyncio.sleep(0.1)
        alive = worker.alive
        worker.stop(10)
        return alive

    assert asyncio.run(run()) is False


def test_a_batch_is_queued_whole_or_not_at_all():
    engine = RolloutEngine(make_model("tiny-qwen3-moe"), max_slots=4, max_seq_len=32)

    async def run():
        worker = EngineWorker(engine)
        worker.start()
        outs = await asyncio.gather(*worker.submit_all([_req("a"), _req("b")]))
        worker.stop(10)
        with pytest.raises(EngineUnavailable, match="not accepting"):
            worker.submit_all([_req("c"), _req("d")])
        return outs, len(worker._pending)

    outs, pending = asyncio.run(run())
    assert [o.request_id for o in outs] == ["a", "b"] and pending == 0


def test_cancel_frees_the_slots_of_running_requests():
    engine = RolloutEngine(make_model("tiny-qwen3-moe"), max_slots=2, max_seq_len=64)

    async def run():
        worker = EngineWorker(engine)
        worker.start()
        long = [EngineRequest(request_id=f"long{i}", input_ids=[1, 2], sampling=SamplingParams(max_new_tokens=60))
                for i in range(2)]
        futures = worker.submit_all(long)
        while worker.num_running < 2:
            await asyncio.sleep(0.01)
        worker.cancel(["long0", "long1"])
        results = await asyncio.gather(*futures, return_exceptions=True)
        short = await worker.submit(_req("short"))
        worker.stop(10)
        return results, short

    results, short = asyncio.run(run())
    assert all(isinstance(r, RequestAborted) for r in results) and len(short.output_ids) == 3
    assert not engine.has_work()
