"""Client-side rate limits (token buckets for requests/min and tokens/min) and the retry policy."""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import dataclass

import openai

BURST_S = 1.0  # a bucket holds at most one second's worth of its rate (at least one request)


class TokenBucket:
    """Tokens refill at ``rate`` per second up to ``capacity``; waiters are served in FIFO order.

    Over any interval of length ``w`` at most ``capacity + rate * w`` tokens are taken.
    A request larger than ``capacity`` waits for a full bucket and leaves it in debt.
    """

    def __init__(self, rate: float, capacity: float) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError(
                f"token bucket needs rate > 0 and capacity > 0, got {rate}, {capacity}"
            )
        self.rate, self.capacity = rate, capacity
        self.level = capacity
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def acquire(self, n: float) -> None:
        """Wait until ``n`` tokens (at most a full bucket) are available, then take them."""
        async with self._lock:
            need = min(n, self.capacity)
            self._refill()
            while self.level < need:
                await asyncio.sleep((need - self.level) / self.rate)
                self._refill()
            self.level -= n

    def adjust(self, n: float) -> None:
        """Give back ``n`` unused tokens (never above capacity), or take ``-n`` more (debt)."""
        self._refill()
        self.level = min(self.capacity, self.level + n)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limits (either may be None: unlimited).

    A request reserves its estimated tokens (prompt estimate + max_tokens) before it is sent;
    :meth:`settle` returns the difference once the real usage is known.
    """

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        self.requests = self.tokens = None
        if requests_per_minute is not None:
            rate = requests_per_minute / 60.0
            self.requests = TokenBucket(rate, max(1.0, rate * BURST_S))
        if tokens_per_minute is not None:
            rate = tokens_per_minute / 60.0
            self.tokens = TokenBucket(rate, max(1.0, rate * BURST_S))

    async def acquire(self, est_tokens: int) -> None:
        """Wait for one request slot and ``est_tokens`` tokens."""
        if self.requests is not None:
            await self.requests.acquire(1)
        if self.tokens is not None:
            await self.tokens.acquire(est_tokens)

    def settle(self, est_tokens: int, used_tokens: int) -> None:
        """Correct a reservation of ``est_tokens`` to the ``used_tokens`` really consumed."""
        if self.tokens is not None:
            self.tokens.adjust(est_tokens - used_tokens)


@dataclass
class Verdict:
    """What a failed attempt means: ``retry`` it, fail its prompt (``permanent``), or stop
    the whole fetch (``fatal``: the key or the model is rejected; ``request``: an HTTP 400 that
    names a request parameter, which every prompt would get)."""

    kind: str
    reason: str
    retry_after: float | None = None
    param: str | None = None  # kind "request": the request parameter the endpoint rejected


def _retry_after(headers) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        date = email.utils.parsedate_to_datetime(value) if value.strip() else None
        return None if date is None else max(0.0, date.timestamp() - time.time())


def classify(err: Exception, timeout_s: float) -> Verdict:
    """Whether a failed attempt is retried, fails its prompt, or stops the whole fetch."""
    if isinstance(err, openai.APITimeoutError):
        return Verdict("retry", f"timeout after {timeout_s:g}s")
    if isinstance(err, openai.APIConnectionError):
        cause = err.__cause__
        return Verdict("retry", f"connection error ({type(cause or err).__name__})")
    if isinstance(err, openai.APIStatusError):
        code, headers = err.status_code, err.response.headers
        message = f"HTTP {code}: {_error_message(err)}"
        if code == 429:
            return Verdict("retry", message, _retry_after(headers))
        if code >= 500 or code in (408, 409):
            return Verdict("retry", message, _retry_after(headers))
        if code in (401, 403):
            return Verdict("fatal", f"the teacher endpoint rejected the API key ({message})")
        if code == 404:
            return Verdict("fatal", f"the teacher endpoint or model was not found ({message})")
        if code == 400 and (param := _rejected_param(err)) is not None:
            return Verdict("request", message, param=param)
        return Verdict("permanent", message)
    if isinstance(err, ValueError | openai.APIResponseValidationError):
        return Verdict("retry", f"malformed response ({type(err).__name__})")
    return Verdict("fatal", f"unexpected {type(err).__name__}: {err}")


# a 400 with one of these params or codes is about the prompt, not about the request's settings
_PROMPT_PARAMS = ("messages", "prompt", "input")
_PROMPT_CODES = ("context_length_exceeded", "content_policy_violation", "content_filter")


def _rejected_param(err: openai.APIStatusError) -> str | None:
    """The request parameter an HTTP 400 names (OpenAI's error object: ``param`` set), unless
    the error is about the prompt itself (its messages, length or content)."""
    body = err.body if isinstance(err.body, dict) else {}
    body = body.get("error", body) if isinstance(body.get("error"), dict) else body
    param, code = body.get("param"), body.get("code")
    if not isinstance(param, str) or not param or code in _PROMPT_CODES:
        return None
    return None if param.startswith(_PROMPT_PARAMS) else param


def _error_message(err: openai.APIStatusError) -> str:
    body = err.body
    if isinstance(body, dict):
        return str(body.get("message") or json.dumps(body))[:300]
    return str(body or err.message)[:300]


def backoff_delay(attempt: int, base_s: float, max_s: float, retry_after: float | None) -> float:
    """Seconds before retry ``attempt`` (1-based): Retry-After when given (plus up to 10%),
    else exponential ``base_s * 2**(attempt-1)`` capped at ``max_s``, with jitter in [50%, 100%]."""
    if retry_after is not None:
        return retry_after * random.uniform(1.0, 1.1)
    return min(max_s, base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
