from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FromWorker(_message.Message):
    __slots__ = ("hello", "figures", "chunk", "ended", "score")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    FIGURES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    figures: Figures
    chunk: JobChunk
    ended: JobEnded
    score: ScoreResult
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., figures: _Optional[_Union[Figures, _Mapping]] = ..., chunk: _Optional[_Union[JobChunk, _Mapping]] = ..., ended: _Optional[_Union[JobEnded, _Mapping]] = ..., score: _Optional[_Union[ScoreResult, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("registration_json", "tokenizer_files", "stats_json")
    class TokenizerFilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    REGISTRATION_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FILES_FIELD_NUMBER: _ClassVar[int]
    STATS_JSON_FIELD_NUMBER: _ClassVar[int]
    registration_json: str
    tokenizer_files: _containers.ScalarMap[str, bytes]
    stats_json: str
    def __init__(self, registration_json: _Optional[str] = ..., tokenizer_files: _Optional[_Mapping[str, bytes]] = ..., stats_json: _Optional[str] = ...) -> None: ...

class Figures(_message.Message):
    __slots__ = ("stats_json", "health_error")
    STATS_JSON_FIELD_NUMBER: _ClassVar[int]
    HEALTH_ERROR_FIELD_NUMBER: _ClassVar[int]
    stats_json: str
    health_error: str
    def __init__(self, stats_json: _Optional[str] = ..., health_error: _Optional[str] = ...) -> None: ...

class JobChunk(_message.Message):
    __slots__ = ("job_id", "chunk_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    chunk_json: str
    def __init__(self, job_id: _Optional[str] = ..., chunk_json: _Optional[str] = ...) -> None: ...

class JobEnded(_message.Message):
    __slots__ = ("job_id", "error", "kind")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    error: str
    kind: str
    def __init__(self, job_id: _Optional[str] = ..., error: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("call_id", "result_json", "error")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    result_json: str
    error: str
    def __init__(self, call_id: _Optional[int] = ..., result_json: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ToWorker(_message.Message):
    __slots__ = ("welcome", "generate", "cancel", "renew", "score")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    RENEW_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    generate: Generate
    cancel: Cancel
    renew: Renew
    score: Score
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., generate: _Optional[_Union[Generate, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., renew: _Optional[_Union[Renew, _Mapping]] = ..., score: _Optional[_Union[Score, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("worker", "operator")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    worker: str
    operator: str
    def __init__(self, worker: _Optional[str] = ..., operator: _Optional[str] = ...) -> None: ...

class Generate(_message.Message):
    __slots__ = ("job_id", "prompt_ids", "params_json", "resume_json", "lease_s")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    RESUME_JSON_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    params_json: str
    resume_json: str
    lease_s: float
    def __init__(self, job_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., params_json: _Optional[str] = ..., resume_json: _Optional[str] = ..., lease_s: _Optional[float] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Renew(_message.Message):
    __slots__ = ("job_ids", "lease_s")
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    job_ids: _containers.RepeatedScalarFieldContainer[str]
    lease_s: float
    def __init__(self, job_ids: _Optional[_Iterable[str]] = ..., lease_s: _Optional[float] = ...) -> None: ...

class Score(_message.Message):
    __slots__ = ("call_id", "prompt_ids", "token_ids", "temperature")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    temperature: float
    def __init__(self, call_id: _Optional[int] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ..., temperature: _Optional[float] = ...) -> None: ...
