"""The worker contract: what each side sends is checked field by field on the other."""

from __future__ import annotations

import dataclasses

import pytest

from sparkgrid.contract import (
    Chunk,
    ContractError,
    Resume,
    SamplingParams,
    SpecCounts,
    Usage,
    WorkerStats,
)
from sparkgrid.costs import SPSTable


def test_every_message_round_trips_through_its_wire_form(stats_wire):
    messages = [
        SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=3, max_tokens=9, stop=("\n",)),
        Resume(token_ids=(1, 2), num_chars=3),
        Chunk("j", (1, 2), "ab", "stop", Usage(3, 2), SpecCounts(4, 3, 2, 1)),
        Chunk("j", (), "", None, None, SpecCounts()),
        WorkerStats.from_dict(stats_wire()),
    ]
    for message in messages:
        wire = message.to_dict()
        assert type(message).from_dict(wire) == message
        assert all(not dataclasses.is_dataclass(v) for v in wire.values())  # plain data


def test_worker_stats_fill_the_snapshot_fields_the_router_reads(stats_wire):
    s = WorkerStats.from_dict(stats_wire(max_num_seqs=16))
    assert s.max_num_seqs == 16 and isinstance(s.sps, SPSTable) and s.sps(4) > 0


@pytest.mark.parametrize("change,field", [
    ({"tokens_per_s": "fast"}, "WorkerStats.tokens_per_s"),
    ({"num_waiting": -1}, "WorkerStats.num_waiting"),
    ({"num_running": 1.5}, "WorkerStats.num_running"),
    ({"price_per_hour": float("nan")}, "WorkerStats.price_per_hour"),
    ({"state": "happy"}, "WorkerStats.state"),
    ({"verify_policy": "magic"}, "WorkerStats.verify_policy"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"cache_used_fraction": 2.0}, "WorkerStats.cache_used_fraction"),
    ({"sps": {"batch_tokens": [2], "steps_per_second": [1.0]}}, "WorkerStats.sps"),
    ({"version": {"torch": 2}}, "WorkerStats.version.torch"),
    ({"requests": True}, "WorkerStats.requests"),
    ({"gpu_type": " "}, "WorkerStats.gpu_type"),
    ({"model_id": ""}, "WorkerStats.model_id"),
    ({"tokens_per_s": 1e6 + 1}, "WorkerStats.tokens_per_s"),  # plausibility bounds
    ({"sps": {"batch_tokens": [1, 8], "steps_per_second": [2e6, 1.0]}},
     "WorkerStats.sps.steps_per_second"),
    ({"mean_accept_length": 513.0}, "WorkerStats.mean_accept_length"),
])
def test_a_bad_figure_is_refused_naming_the_field(change, field, stats_wire):
    with pytest.raises(ContractError, match=field.replace(".", r"\.")):
        WorkerStats.from_dict(stats_wire(**change))


def test_a_renamed_or_missing_field_fails_loudly(stats_wire):
    renamed = stats_wire()
    renamed["policy"] = renamed.pop("verify_policy")
    with pytest.raises(ContractError, match=r"unknown fields \['policy'\]"):
        WorkerStats.from_dict(renamed)
    missing = stats_wire()
    del missing["model_id"]
    with pytest.raises(ContractError, match=r"missing fields \['model_id'\]"):
        WorkerStats.from_dict(missing)


@pytest.mark.parametrize("wire,field", [
    ({"job_id": "j", "token_ids": [1, "2"], "text": ""}, r"Chunk\.token_ids\[1\]"),
    ({"job_id": "j", "token_ids": [], "text": "", "finish_reason": "done",
      "usage": {"prompt_tokens": 1, "completion_tokens": 0}}, r"Chunk\.finish_reason"),
    ({"job_id": "j", "token_ids": [], "text": "", "finish_reason": "stop"}, r"Chunk\.usage"),
    ({"job_id": "j", "token_ids": [], "text": "",
      "usage": {"prompt_tokens": 1, "completion_tokens": 0}}, r"Chunk\.usage"),
    ({"job_id": "j", "token_ids": [], "text": "", "spec": {"draft_tokens": -4}},
     r"Chunk\.spec\.draft_tokens"),
    ({"job_id": "j", "token_ids": [], "text": b"bytes"}, r"Chunk\.text"),
    ({"job_id": "j", "token_ids": [], "text": "", "stats": {}}, r"unknown fields \['stats'\]"),
    ("not a dict", "expected an object"),
])
def test_a_bad_chunk_is_refused_naming_the_field(wire, field):
    with pytest.raises(ContractError, match=field):
        Chunk.from_dict(wire)


@pytest.mark.parametrize("wire,field", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": [""]}, "stop"),
    ({"seed": True}, "seed"),
    ({"temprature": 1.0}, r"unknown fields \['temprature'\]"),
])
def test_bad_job_parameters_are_refused_naming_the_field(wire, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_dict(wire, "params")


def test_resume_refuses_bad_token_ids():
    with pytest.raises(ValueError, match="token_ids"):
        Resume.from_dict({"token_ids": [1, -2]}, "resume")
    assert Resume.from_dict({}, "resume") == Resume()


@pytest.mark.parametrize("temperature", [1.4e-45, 1e-30, 9.9e-6])
def test_a_vanishing_temperature_is_greedy_not_nan(temperature):
    assert SamplingParams(temperature=temperature).temperature == 0.0
    assert SamplingParams.from_dict({"temperature": temperature}).temperature == 0.0
    assert SamplingParams(temperature=1e-5).temperature == 1e-5
