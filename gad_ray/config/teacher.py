"""The ``teacher`` and ``fetch`` sections: the black-box teacher API and its budget."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from gad_ray.config.base import Strict


class TeacherBudget(Strict):
    max_requests: int | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)
    max_dollars: float | None = Field(None, gt=0)


class HeaderFromEnv(Strict):
    """A secret HTTP header value, read from the environment variable ``env`` when the fetch
    starts; only the variable's name is in the config."""

    env: str = Field(min_length=1)


# header names that carry credentials: their values must come from the environment
_SECRET_HEADER_WORDS = ("auth", "key", "token", "secret", "password", "cookie", "signature")
# request fields the fetcher sets itself (teacher.api.extra_body cannot hold them)
_MANAGED_FIELDS = {
    "model": "teacher.api.model",
    "messages": "the prompt",
    "temperature": "teacher.api.temperature",
    "top_p": "teacher.api.top_p",
    "max_tokens": "teacher.api.max_tokens",
    "max_completion_tokens": "teacher.api.max_tokens (with max_tokens_param)",
    "n": "one response per request",
    "stream": "non-streaming requests",
}


class TeacherAPIConfig(Strict):
    """An OpenAI-compatible endpoint. The key is read from the env var named here, never stored.

    ``temperature``, ``top_p`` or ``max_tokens`` set to None are left out of the request (the
    endpoint's default applies). See docs/teacher.md "Teacher requests"."""

    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    system_prompt: str | None = None
    temperature: float | None = Field(1.0, ge=0)
    top_p: float | None = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(1536, gt=0)
    # the request field that carries max_tokens (newer OpenAI models take only
    # max_completion_tokens); the cache key is the same under either name
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    # more request fields, sent as the OpenAI client's extra_body (part of the cache key)
    extra_body: dict[str, Any] = {}
    # more HTTP headers: a plain string value, or {env: VAR} for a secret (read from the
    # environment, never logged or stored); not part of the cache key
    headers: dict[str, str | HeaderFromEnv] = {}
    concurrency: int = Field(16, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    max_retries: int = Field(8, ge=0)
    timeout_s: float = Field(120.0, gt=0)
    backoff_base_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)
    # training waits this long for an unreachable API (only for the prompts it lacks), then
    # stops with a checkpoint
    outage_timeout_s: float = Field(1800.0, gt=0)
    cache_path: str = "teacher_cache.sqlite"
    # false: the k-th occurrence of a prompt in the data gets its own sample k (the teacher's
    # distribution is kept); true: every occurrence shares one response (one request per prompt)
    dedup: bool = False
    price_per_1k_prompt_tokens: float = Field(0.0, ge=0)
    price_per_1k_completion_tokens: float = Field(0.0, ge=0)
    budget: TeacherBudget = TeacherBudget()

    @field_validator("extra_body", "headers", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value  # YAML null: a dict a CLI override can replace

    @field_validator("extra_body")
    @classmethod
    def _extra_body(cls, body: dict[str, Any]) -> dict[str, Any]:
        for name in body:
            if name in _MANAGED_FIELDS:
                raise ValueError(
                    f"the fetcher sets {name!r} itself ({_MANAGED_FIELDS[name]}); remove "
                    f"teacher.api.extra_body.{name}"
                )
        try:
            json.dumps(body)
        except (TypeError, ValueError) as e:
            raise ValueError(f"not JSON: {e}") from None
        return body

    @field_validator("headers")
    @classmethod
    def _headers(cls, headers: dict[str, str | HeaderFromEnv]) -> dict:
        for name, value in headers.items():
            if isinstance(value, str) and any(w in name.lower() for w in _SECRET_HEADER_WORDS):
                raise PydanticCustomError(  # type "secret": the error does not show the value
                    "secret",
                    f"header {name} looks like a credential: its value comes from the environment,"
                    f" not the config: teacher.api.headers.{name}={{env: SOME_VAR}}",
                )
        return headers


class TeacherConfig(Strict):
    source: Literal["dataset", "api"] = "dataset"
    api: TeacherAPIConfig = TeacherAPIConfig()
    prefetch_batches: int = Field(2, ge=0)


class FetchConfig(Strict):
    """``gad-fetch``: fill a prompt file with teacher responses."""

    input: str | None = None  # default: data.train_path
    output: str | None = None  # default: <stem>.teacher.jsonl|parquet beside the input
    retry_failed: bool = False  # ask again for prompts that failed permanently before
