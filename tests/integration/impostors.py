"""A stranger's Ray actor in the `sparkgrid` namespace that answers like a worker but says what
a test wants it to: its `stats()`, the chunks of every job, the tokenizer files it lends.

Knows: the worker actor's methods. Does not know: what any test checks.
"""

from __future__ import annotations


def impostor_class():
    """The actor class (made on first use: it needs Ray). `Impostor.options(name=...,
    namespace=...).remote(stats, chunks, tokenizer_files, registration=None)`: `chunks` are
    what every job streams, each with this job's id; `registration()` answers `registration`;
    `served()` counts the jobs it was given."""
    import ray

    @ray.remote
    class Impostor:
        def __init__(self, stats: dict, chunks: list[dict], tokenizer_files: dict,
                     registration: dict | None = None):
            self._stats, self._chunks, self._files = stats, chunks, tokenizer_files
            self._registration = registration
            self._served = 0

        async def registration(self):
            return self._registration

        async def stats(self):
            return self._stats

        async def check_health(self):
            return None

        async def renew(self, job_ids, lease_s):
            return []

        async def cancel(self, job_id):
            return True

        async def tokenizer_files(self):
            return self._files

        async def served(self):
            return self._served

        @ray.method(num_returns="streaming")
        async def generate(self, job_id, prompt_ids, params, resume, lease_s):
            self._served += 1
            for chunk in self._chunks:
                yield {**chunk, "job_id": job_id}

    return Impostor
