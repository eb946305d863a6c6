"""What one teacher request sends: the messages, the parameters (and which are in the cache
key), the headers with their secrets, and the config key to change when the endpoint rejects a
parameter (docs/teacher.md "Teacher requests")."""

from __future__ import annotations

import os

from gad_ray.config.schema import InputError, TeacherAPIConfig


class TeacherError(InputError, RuntimeError):
    """The fetch cannot go on (no key, unreachable endpoint, key, model or a parameter rejected)."""


def read_secrets(api: TeacherAPIConfig) -> tuple[str, dict[str, str]]:
    """The key from the env var named by ``api.api_key_env`` and the HTTP headers of
    ``api.headers``, a ``{env: VAR}`` value read from its variable; errors name the var only."""
    key = os.environ.get(api.api_key_env, "")
    if not key.strip():
        raise TeacherError(
            f"no teacher API key: environment variable {api.api_key_env} is not set or empty "
            f"(teacher.api.api_key_env={api.api_key_env!r})"
        )
    headers = {}
    for name, value in api.headers.items():
        if isinstance(value, str):
            headers[name] = value
            continue
        headers[name] = os.environ.get(value.env, "")
        if not headers[name].strip():
            raise TeacherError(
                f"no value for the teacher header {name}: environment variable {value.env} is "
                f"not set or empty (teacher.api.headers.{name}.env={value.env!r})"
            )
    return key, headers


def request_params(api: TeacherAPIConfig) -> tuple[dict, dict]:
    """``(key_params, request)``: the parameters in the cache key and the keyword arguments of
    ``chat.completions.create`` besides model and messages.

    A None temperature / top_p / max_tokens is left out of both. The cache key names the
    length limit ``max_tokens`` whichever field carries it (``api.max_tokens_param``: the same
    limit, the same answers); ``extra_body`` is in the key when set (it can change the answers).
    With the defaults the key params are ``{temperature, top_p, max_tokens}`` as before these
    options existed, so older caches keep serving.
    """
    values = {"temperature": api.temperature, "top_p": api.top_p, "max_tokens": api.max_tokens}
    key_params = {k: v for k, v in values.items() if v is not None}
    request = {k: v for k, v in key_params.items() if k != "max_tokens"}
    if api.max_tokens is not None:
        request[api.max_tokens_param] = api.max_tokens
    if api.extra_body:
        key_params["extra_body"] = api.extra_body
        request["extra_body"] = api.extra_body
    return key_params, request


def rejected_param_hint(api: TeacherAPIConfig, param: str) -> str:
    """The config key to change for a request parameter the endpoint rejects."""
    name = param.split(".")[0].split("[")[0]
    if name in ("max_tokens", "max_completion_tokens"):
        return (
            f"teacher.api.max_tokens_param (max_tokens | max_completion_tokens; now "
            f"{api.max_tokens_param}) or teacher.api.max_tokens (null sends no limit)"
        )
    if name in ("temperature", "top_p"):
        return f"teacher.api.{name} (null leaves it out of the request)"
    if name in api.extra_body:
        return f"teacher.api.extra_body.{name}"
    if name == "model":
        return "teacher.api.model"
    return "teacher.api.extra_body or teacher.api.headers"


def request_messages(api: TeacherAPIConfig, prompt: str | list[dict]) -> list[dict]:
    """The messages sent for a prompt (a string or chat messages), with the system prompt."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if api.system_prompt and not (msgs and msgs[0].get("role") == "system"):
        msgs = [{"role": "system", "content": api.system_prompt}, *msgs]
    return [{"role": m["role"], "content": m["content"]} for m in msgs]
