"""The server's engine worker in-process: a failed engine step fails only the requests it was running."""

import asyncio
import time

import pytest

from r3rl.models.presets import make_model
from r3rl.rollout import EngineRequest, RolloutEngine, SamplingParams
from r3rl.rollout.net.worker import (
    MAX_STEP_FAILURES,
    AdmissionConfig,
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
        deadline = time.monotonic() + 10  # the worker thread ends right after failing the request: wait for it
        while worker.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
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


def _long(rid, n=60):
    return EngineRequest(request_id=rid, input_ids=[1, 2], sampling=SamplingParams(max_new_tokens=n, seed=0))


@pytest.mark.parametrize("hold", [0, 1000])
def test_new_requests_are_held_while_others_run_and_a_cancelled_held_one_never_runs(hold):
    """With holding on, a lone new request waits (up to max_hold_steps) while the engine runs two others; cancelled
    meanwhile it never reaches the engine. Negative control: with holding off it is admitted, and runs, at once."""
    engine = RolloutEngine(make_model("tiny-qwen3-moe"), max_slots=4, max_seq_len=1024)

    async def run():
        worker = EngineWorker(engine, admission=AdmissionConfig(max_hold_steps=hold, min_batch_fraction=1.0))
        worker.start()
        futures = worker.submit_all([_long("l0", 1000), _long("l1", 1000)])
        while worker.num_running < 2:
            await asyncio.sleep(0.01)
        futures.append(worker.submit(_long("late", 40)))
        deadline = time.monotonic() + 10  # until the worker has seen it: held (hold on) or admitted (hold off)
        while time.monotonic() < deadline and (worker.stats()["held_requests"] if hold
                                               else worker.stats()["admitted"] - 2) < 1:
            await asyncio.sleep(0.01)
        worker.cancel(["late", "l0", "l1"])
        results = await asyncio.gather(*futures, return_exceptions=True)
        worker.stop(10)
        return results, worker.stats()

    results, stats = asyncio.run(run())
    assert all(isinstance(r, RequestAborted) for r in results) and not engine.has_work()
    if hold:
        assert stats["held_requests"] == 1 and stats["admitted"] == 2, "the held request must never reach the engine"
    else:
        assert stats["held_requests"] == 0 and stats["admitted"] == 3


def test_held_requests_are_admitted_after_max_hold_steps_and_stats_count_the_steps():
    """A held request still runs once max_hold_steps pass; the counters match the work (30 tokens = 29 steps: the
    prefill step emits the first token)."""
    engine = RolloutEngine(make_model("tiny-qwen3-moe"), max_slots=4, max_seq_len=64)

    async def run():
        worker = EngineWorker(engine, admission=AdmissionConfig(max_hold_steps=3, min_batch_fraction=1.0))
        worker.start()
        long = worker.submit_all([_long("l0", 30), _long("l1", 30)])
        while worker.num_running < 2:
            await asyncio.sleep(0.01)
        late = await worker.submit(_req("late"))
        await asyncio.gather(*long)
        worker.stop(10)
        return late, worker.stats()

    late, stats = asyncio.run(run())
    assert len(late.output_ids) == 3 and stats["held_requests"] == 1 and stats["admitted"] == 3
    assert stats["prefill_steps"] == 2 and stats["finished"] == 3 and stats["generated_tokens"] == 63
    assert stats["steps"] == 29 and 2 <= stats["mean_batch"] <= 3 and stats["mean_step_ms"] > 0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_hold_steps": -1}, "max_hold_steps must be >= 0: got -1"),
    ({"min_batch_fraction": 1.5}, r"min_batch_fraction must be in \[0, 1\]"),
])
def test_bad_admission_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdmissionConfig(**kwargs)
