"""Strangers' Ray actors in the `sparkgrid` namespace that answer like a worker but say what a
test wants them to: their `stats()`, the chunks of every job (or a real worker's, relayed
late), the tokenizer files they lend, the registration they show.

Knows: the worker actor's methods. Does not know: what any test checks.
"""

from __future__ import annotations


def _claims():
    """The base of both kinds: what they answer alike (the figures given, healthy, no leases
    kept). Made in a function, so that Ray ships the class by value: the workers cannot import
    this test module."""

    class Claims:
        _stats: dict
        _registration: dict | None = None
        _served = 0

        async def registration(self):
            return self._registration

        async def stats(self):
            return self._stats

        async def check_health(self):
            return None

        async def renew(self, job_ids, lease_s):
            return []

        async def served(self):
            return self._served

    return Claims


def impostor_class():
    """The actor class (made on first use: it needs Ray). `Impostor.options(name=...,
    namespace=...).remote(stats, chunks, tokenizer_files, registration=None)`: `chunks` are
    what every job streams, each with this job's id; `registration()` answers `registration`;
    `served()` counts the jobs it was given."""
    import ray

    @ray.remote
    class Impostor(_claims()):
        def __init__(self, stats: dict, chunks: list[dict], tokenizer_files: dict,
                     registration: dict | None = None):
            self._stats, self._chunks, self._files = stats, chunks, tokenizer_files
            self._registration = registration

        async def cancel(self, job_id):
            return True

        async def tokenizer_files(self):
            return self._files

        @ray.method(num_returns="streaming")
        async def generate(self, job_id, prompt_ids, params, resume, lease_s):
            self._served += 1
            for chunk in self._chunks:
                yield {**chunk, "job_id": job_id}

    return Impostor


def relay_class():
    """An actor that says what `stats` say and relays every job to the real worker `target`,
    `delay_s` late at every chunk: its tokens are real, it is only slower than it claims.
    `Relay.options(...).remote(stats, target, delay_s)`."""
    import asyncio

    import ray

    @ray.remote
    class Relay(_claims()):
        def __init__(self, stats: dict, target, delay_s: float):
            self._stats, self._target, self._delay_s = stats, target, delay_s

        async def cancel(self, job_id):
            return await self._target.cancel.remote(job_id)

        async def tokenizer_files(self):
            return await self._target.tokenizer_files.remote()

        @ray.method(num_returns="streaming")
        async def generate(self, job_id, prompt_ids, params, resume, lease_s):
            self._served += 1
            async for ref in self._target.generate.remote(job_id, prompt_ids, params, resume):
                chunk = await ref
                await asyncio.sleep(self._delay_s)
                yield chunk

    return Relay
