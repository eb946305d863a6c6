import asyncio
import time

import httpx2
import openai
import pytest

from gad_ray.teacher.limits import RateLimiter, TokenBucket, backoff_delay, classify


def _status_error(cls, code: int, headers: dict | None = None) -> openai.APIStatusError:
    req = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
    resp = httpx2.Response(code, headers=headers or {}, request=req)
    return cls("boom", response=resp, body={"message": "boom"})


def test_token_bucket_bounds_any_window():
    async def run() -> list[float]:
        bucket = TokenBucket(rate=200.0, capacity=20.0)
        stamps = []

        async def take():
            await bucket.acquire(1)
            stamps.append(time.monotonic())

        await asyncio.gather(*(take() for _ in range(80)))
        return stamps

    stamps = sorted(asyncio.run(run()))
    for i in range(len(stamps)):
        for j in range(i, len(stamps)):
            assert j - i + 1 <= 20 + 200.0 * (stamps[j] - stamps[i]) + 1
    assert stamps[-1] - stamps[0] >= (80 - 20) / 200.0 * 0.9


def test_token_bucket_oversized_request_waits_for_full_bucket_then_owes():
    async def run() -> float:
        bucket = TokenBucket(rate=100.0, capacity=10.0)
        await bucket.acquire(30)  # full bucket: goes at once, leaves 20 tokens of debt
        t0 = time.monotonic()
        await bucket.acquire(1)  # waits for the debt plus one token: ~0.21 s
        return time.monotonic() - t0

    assert asyncio.run(run()) >= 0.18


def test_rate_limiter_settle_refunds_unused_tokens():
    async def run() -> float:
        lim = RateLimiter(None, tokens_per_minute=60 * 100)  # 100 tokens/s, bucket of 100
        await lim.acquire(100)
        lim.settle(100, 10)  # only 10 used: 90 come back
        t0 = time.monotonic()
        await lim.acquire(90)
        return time.monotonic() - t0

    assert asyncio.run(run()) < 0.05


def test_classify_and_backoff():
    assert (
        classify(_status_error(openai.RateLimitError, 429, {"retry-after": "2"}), 1).retry_after
        == 2
    )
    v = classify(_status_error(openai.RateLimitError, 429, {"retry-after-ms": "250"}), 1)
    assert (v.kind, v.retry_after) == ("retry", 0.25)
    assert classify(_status_error(openai.InternalServerError, 503), 1).kind == "retry"
    assert classify(_status_error(openai.AuthenticationError, 401), 1).kind == "fatal"
    assert classify(_status_error(openai.NotFoundError, 404), 1).kind == "fatal"
    bad = classify(_status_error(openai.BadRequestError, 400), 1)
    assert (bad.kind, bad.reason) == ("permanent", "HTTP 400: boom")
    assert classify(ValueError("Unterminated string"), 1).kind == "retry"
    for attempt in range(1, 8):
        d = backoff_delay(attempt, 0.1, 1.0, None)
        assert 0.5 * min(1.0, 0.1 * 2 ** (attempt - 1)) <= d <= min(1.0, 0.1 * 2 ** (attempt - 1))
    assert 3.0 <= backoff_delay(1, 0.1, 1.0, 3.0) <= 3.3


def test_bucket_rejects_bad_rates():
    with pytest.raises(ValueError, match="rate > 0"):
        TokenBucket(0, 1)


def _bad_request(**error) -> openai.BadRequestError:
    """A 400 as the openai client raises it: ``body`` is the error object of the JSON body."""
    req = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
    resp = httpx2.Response(400, request=req)
    return openai.BadRequestError("bad", response=resp, body={"message": "bad", **error})


@pytest.mark.parametrize(
    ("error", "kind", "param"),
    [
        ({"param": "max_tokens", "code": "unsupported_parameter"}, "request", "max_tokens"),
        ({"param": "temperature", "code": "unsupported_value"}, "request", "temperature"),
        ({"param": "reasoning_effort"}, "request", "reasoning_effort"),
        ({"param": None, "code": None}, "permanent", None),  # about the prompt: today's failure
        ({"param": "messages", "code": "context_length_exceeded"}, "permanent", None),
        ({"param": "messages[0].content"}, "permanent", None),
        ({"param": "prompt", "code": "content_policy_violation"}, "permanent", None),
        ({"param": "temperature", "code": "content_filter"}, "permanent", None),
    ],
)
def test_a_400_naming_a_request_parameter_is_not_a_prompts_failure(error, kind, param):
    v = classify(_bad_request(**error), 1)
    assert (v.kind, v.param, v.reason) == (kind, param, "HTTP 400: bad")
