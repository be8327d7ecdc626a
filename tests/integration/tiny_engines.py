"""Engines over the small structured pairs (`structured.py`), for the engine's tests."""

from __future__ import annotations

from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine


def make_engine(pair, tmp_path, **overrides) -> LLMEngine:
    target, draft, tok, _ = pair
    cfg = dict(dtype="float64", sps_cache_dir=str(tmp_path), sps_context_len=32,
               max_batch_tokens=128)
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg), target, tok, draft)


def count_calls(obj, name: str) -> list[int]:
    """Wrap a real method to count its calls (the method still runs)."""
    calls = [0]
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)
    return calls
