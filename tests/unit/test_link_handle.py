"""A linked worker's handle, as the pool calls it: the same shape as a Ray actor's handle, its
streams and calls ended by what the link reports, never hanging when the link closes."""

from __future__ import annotations

import asyncio

import pytest

from scheduler import link_handle
from scheduler.link_handle import LinkCallFailed, LinkGone, LinkHandle


def make() -> LinkHandle:
    return LinkHandle("lk-1", {"name": "lk-1"}, {"tokenizer.json": b"{}"}, {"worker": "lk-1"})


def test_a_job_streams_its_chunks_in_order_and_ends_after_the_last():
    async def go():
        handle = make()
        stream = handle.generate.remote("j1", [1, 2], {"max_tokens": 4}, None, 10.0)
        sent = handle.down.get_nowait()
        assert sent.generate.job_id == "j1" and list(sent.generate.prompt_ids) == [1, 2]
        handle.took_chunk("j1", {"n": 1})
        handle.took_chunk("j1", {"n": 2})
        handle.took_chunk("other", {"n": 9})  # a job it does not have: dropped
        got = [await (await stream.__anext__()) for _ in range(2)]
        stream.close()
        handle.took_chunk("j1", {"n": 3})  # late, after the scheduler gave up: dropped
        return got, handle._streams
    got, streams = asyncio.run(go())
    assert got == [{"n": 1}, {"n": 2}] and streams == {}


@pytest.mark.parametrize("kind,cause", [("invalid", ValueError), ("failed", RuntimeError)])
def test_a_job_the_worker_ends_raises_what_the_pool_maps(kind, cause):
    async def go():
        handle = make()
        stream = handle.generate.remote("j1", [1], {}, None, 10.0)
        handle.job_ended("j1", "max_tokens: too many", kind)
        with pytest.raises(LinkCallFailed) as err:
            await stream.__anext__()
        return err.value
    err = asyncio.run(go())
    assert isinstance(err.cause, cause) and "max_tokens" in str(err.cause)


def test_closing_the_link_ends_every_open_stream_and_call():
    async def go():
        handle = make()
        stream = handle.generate.remote("j1", [1], {}, None, 10.0)
        score = asyncio.ensure_future(handle.score.remote([1], [2], 0.0))
        await asyncio.sleep(0)
        handle.close("the worker's process died")
        with pytest.raises(LinkGone, match="process died"):
            await stream.__anext__()
        with pytest.raises(LinkGone):
            await score
        with pytest.raises(LinkGone):
            await handle.stats.remote()
        late = handle.generate.remote("j2", [1], {}, None, 10.0)  # after the close
        with pytest.raises(LinkGone):
            await late.__anext__()
    asyncio.run(go())


def test_a_score_is_answered_by_its_own_call_id():
    async def go():
        handle = make()
        first = asyncio.ensure_future(handle.score.remote([1], [2], 0.0))
        second = asyncio.ensure_future(handle.score.remote([1], [3], 0.0))
        await asyncio.sleep(0)
        ids = [handle.down.get_nowait().score.call_id for _ in range(2)]
        handle.took_score(ids[1], {"second": True}, "")
        handle.took_score(ids[0], None, "out of memory")
        with pytest.raises(LinkCallFailed, match="out of memory"):
            await first
        return await second
    assert asyncio.run(go()) == {"second": True}


def test_health_follows_the_reported_error_and_silence(monkeypatch):
    async def go():
        handle = make()
        await handle.check_health.remote()
        handle.took_figures({"name": "lk-1", "state": "ready"}, "engine loop stuck")
        with pytest.raises(LinkCallFailed, match="stuck"):
            await handle.check_health.remote()
        handle.took_figures(None, "")
        await handle.check_health.remote()
        assert (await handle.stats.remote())["state"] == "ready"  # a heartbeat keeps them
        monkeypatch.setattr(link_handle, "SILENT_AFTER_S", -1.0)
        with pytest.raises(LinkCallFailed, match="silent"):
            await handle.check_health.remote()
    asyncio.run(go())


def test_a_flooding_worker_or_a_stuck_link_closes_instead_of_growing(monkeypatch):
    monkeypatch.setattr(link_handle, "MAX_PENDING_CHUNKS", 3)
    monkeypatch.setattr(link_handle, "MAX_QUEUED_DOWN", 2)

    async def go():
        handle = make()
        stream = handle.generate.remote("j1", [1], {}, None, 10.0)
        for n in range(4):
            handle.took_chunk("j1", {"n": n})
        assert handle.closed and "unread" in handle.closed
        got = [await (await stream.__anext__()) for _ in range(3)]
        with pytest.raises(LinkGone):
            await stream.__anext__()
        other = make()
        await other.renew.remote(["a"], 1.0)
        await other.renew.remote(["a"], 1.0)
        with pytest.raises(LinkGone, match="cannot keep up"):
            await other.renew.remote(["a"], 1.0)
        return got
    assert len(asyncio.run(go())) == 3
