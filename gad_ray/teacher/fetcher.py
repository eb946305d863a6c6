"""Async teacher-API client: concurrency, rate limits, retries, durable cache, budget; Ray actor.

:class:`Fetcher` is the asyncio core (``await fetcher.fetch_many(prompts, samples)``);
:class:`TeacherFetcher` wraps it as an async Ray actor so the driver can ask for upcoming batches
ahead of time. A prompt's sample index (:func:`occurrence_indices`: its k-th occurrence in the
data is sample k) is part of its cache key, so repeats of a prompt are independent draws from the
teacher, each paid for once.
The API key is read from ``os.environ[api.api_key_env]`` (secret headers from the variables they
name) and never logged, stored or raised.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import openai
import ray

from gad_ray.config.schema import TeacherAPIConfig
from gad_ray.teacher.cache import ResponseCache, Result, messages_hash, request_key
from gad_ray.teacher.limits import RateLimiter, Verdict, backoff_delay, classify
from gad_ray.teacher.request import (
    TeacherError,
    read_secrets,
    rejected_param_hint,
    request_messages,
    request_params,
)

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
UNLIMITED_TOKENS_ESTIMATE = 4096  # the rate limiter's reservation when max_tokens is None


@dataclass
class _Job:
    key: str
    messages: list[dict]
    mhash: str
    future: asyncio.Future
    order: int
    attempts: int = 0
    elapsed_s: float = 0.0
    last_error: str = ""


def read_api_key(api: TeacherAPIConfig) -> str:
    """The key (see :func:`read_secrets`, which also checks the secret headers' variables)."""
    return read_secrets(api)[0]


def occurrence_indices(api: TeacherAPIConfig, prompts: list) -> list[int]:
    """Each prompt's sample index: how many earlier prompts in ``prompts`` send the same request
    messages (0 for a first occurrence). Computed once over a whole dataset in file order, it
    gives every occurrence of a prompt its own teacher response, the same one every epoch."""
    seen: Counter[str] = Counter()
    out = []
    for p in prompts:
        h = messages_hash(request_messages(api, p))
        out.append(seen[h])
        seen[h] += 1
    return out


class Fetcher:
    """Fetch teacher responses through the durable cache, ``api.concurrency`` requests at a time.

    Use as ``async with Fetcher(api) as f: results = await f.fetch_many(prompts, samples)``.
    Results come back in prompt order. A request is (prompt, sample index): the same pair asked
    twice, in one call or across runs, costs one request; another sample of the prompt is a new
    request. With ``api.dedup`` every sample index is 0. ``retry_failed`` re-asks prompts whose
    permanent failure is stored in the cache.
    """

    def __init__(
        self,
        api: TeacherAPIConfig,
        cache: ResponseCache | None = None,
        retry_failed: bool = False,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        if not api.base_url or not api.model:
            raise TeacherError("teacher.api.base_url and teacher.api.model must both be set")
        self.api = api
        self._key, self._headers = read_secrets(api)
        self._secrets = [self._key] + [
            self._headers[n] for n, v in api.headers.items() if not isinstance(v, str)
        ]
        self.cache = cache if cache is not None else ResponseCache(api.cache_path)
        self._own_cache = cache is None
        self.retry_failed = retry_failed
        self.probe_timeout_s = probe_timeout_s
        self.params, self.request = request_params(api)
        self.limiter = RateLimiter(api.requests_per_minute, api.tokens_per_minute)
        self.spent = {k: self.cache.totals()[k] for k in ("requests", "tokens", "dollars")}
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.budget_stop: str | None = None
        self._fatal: TeacherError | None = None
        self._inflight: dict[str, asyncio.Future] = {}
        self._order = itertools.count()
        self._workers: list[asyncio.Task] = []
        self._writes: list[tuple[_Job, Result]] = []
        self._writer: asyncio.Task | None = None
        self._client: openai.AsyncOpenAI | None = None
        self._queue: asyncio.PriorityQueue | None = None

    async def __aenter__(self) -> Fetcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[secret]")
        return text

    async def start(self) -> None:
        """Probe the endpoint (GET /models, short timeout) and start the workers; idempotent."""
        if self._client is not None:
            return
        client = openai.AsyncOpenAI(
            base_url=self.api.base_url,
            api_key=self._key,
            max_retries=0,
            timeout=self.api.timeout_s,
            default_headers=self._headers or None,
        )
        try:
            await client.with_options(timeout=self.probe_timeout_s).models.list()
        except openai.APIConnectionError as e:
            await client.close()
            what = "timed out" if isinstance(e, openai.APITimeoutError) else "connection failed"
            raise TeacherError(
                f"teacher endpoint {self.api.base_url} is unreachable ({what} within "
                f"{self.probe_timeout_s:g}s); check teacher.api.base_url"
            ) from None
        except openai.APIStatusError as e:
            if e.status_code in (401, 403):
                await client.close()
                raise TeacherError(
                    f"teacher endpoint {self.api.base_url} rejected the API key from "
                    f"{self.api.api_key_env} (HTTP {e.status_code})"
                ) from None
        except ValueError:
            pass  # a reachable endpoint with an odd /models answer
        self._client = client
        self._queue = asyncio.PriorityQueue()
        self._workers = [asyncio.create_task(self._work()) for _ in range(self.api.concurrency)]

    async def aclose(self) -> None:
        """Stop the workers and close the HTTP client (and the cache if this fetcher opened it)."""
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._writer is not None:
            await self._writer
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._own_cache:
            self.cache.close()

    def keys(self, prompts: list, samples: list[int] | None = None) -> list[str]:
        """Cache keys of prompts (strings or message lists) and their sample indices (default
        0) under this fetcher's config."""
        samples = [0] * len(prompts) if samples is None else samples
        return [
            self._key_of(request_messages(self.api, p), k)
            for p, k in zip(prompts, samples, strict=True)
        ]

    def _key_of(self, messages: list[dict], sample: int) -> str:
        return request_key(self.api.model, messages, self.params, 0 if self.api.dedup else sample)

    async def fetch_many(
        self,
        prompts: list,
        samples: list[int] | None = None,
        on_result: Callable[[Result], None] | None = None,
    ) -> list[Result]:
        """Results for ``prompts`` (strings or message lists), in order; cached ones cost nothing.

        ``samples``: each prompt's sample index (default all 0: repeats of a prompt share one
        response), e.g. from :func:`occurrence_indices`. ``on_result`` is called once per prompt
        as its result arrives. Raises TeacherError when the fetch cannot go on; a prompt stopped
        by the budget fails with its reason.
        """
        await self.start()
        msgs = [request_messages(self.api, p) for p in prompts]
        samples = [0] * len(prompts) if samples is None else samples
        keys = [self._key_of(m, k) for m, k in zip(msgs, samples, strict=True)]
        stored = self.cache.get_many(keys)
        futures = []
        for key, m in zip(keys, msgs, strict=True):
            fut = self._inflight.get(key)
            hit = stored.get(key)
            if fut is None and hit is not None and (hit.status == "ok" or not self.retry_failed):
                fut = asyncio.get_running_loop().create_future()
                fut.set_result(hit)
                self.counts["cached"] += 1
            elif fut is None:
                fut = self._submit(key, m)
            if on_result is not None:
                fut.add_done_callback(
                    lambda f: f.cancelled() or f.exception() or on_result(f.result())
                )
            futures.append(fut)
        return list(await asyncio.gather(*futures))

    def _submit(self, key: str, messages: list[dict]) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self._fatal is not None:
            fut.set_exception(self._fatal)
            return fut
        job = _Job(key, messages, messages_hash(messages), fut, next(self._order))
        self._inflight[key] = fut
        self.counts["submitted"] += 1
        self._queue.put_nowait((job.order, job))
        return fut

    def _finish(self, job: _Job, result: Result) -> None:
        """Resolve a job; a result to store is committed to the cache first (group commit)."""
        self.counts[result.status] += 1
        if not result.permanent:
            self._resolve(job, result)
            return
        self._writes.append((job, result))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        while self._writes:
            batch, self._writes = self._writes, []
            items = [(r, self.api.model, j.messages, self.params) for j, r in batch]
            try:
                await asyncio.to_thread(self.cache.put_many, items)
            except Exception as e:
                self._fail_all(TeacherError(f"teacher cache {self.cache.path}: write failed: {e}"))
                return
            for job, result in batch:
                self._resolve(job, result)

    def _resolve(self, job: _Job, result: Result) -> None:
        self._inflight.pop(job.key, None)
        if not job.future.done():
            job.future.set_result(result)

    def _fail_all(self, err: TeacherError) -> None:
        self._fatal = err
        for key, fut in list(self._inflight.items()):
            if not fut.done():
                fut.set_exception(err)
            self._inflight.pop(key, None)

    def _budget_reason(self) -> str | None:
        b, s = self.api.budget, self.spent
        if b.max_requests is not None and s["requests"] >= b.max_requests:
            return f"teacher.api.budget.max_requests={b.max_requests} reached"
        if b.max_tokens is not None and s["tokens"] >= b.max_tokens:
            return f"teacher.api.budget.max_tokens={b.max_tokens} reached"
        if b.max_dollars is not None and s["dollars"] >= b.max_dollars:
            return f"teacher.api.budget.max_dollars={b.max_dollars} reached"
        return None

    async def _work(self) -> None:
        while True:
            _, job = await self._queue.get()
            if job.future.done():  # failed by a fatal error while queued
                continue
            try:
                await self._attempt(job)
            except Exception as e:  # a bug must not hang the waiters
                self._fail_all(TeacherError(self._scrub(f"teacher fetch failed: {e!r}")))

    async def _attempt(self, job: _Job) -> None:
        if (reason := self._budget_reason()) is not None:
            if self.budget_stop is None:
                self.budget_stop = reason
                log.warning("teacher budget: %s; no new requests are sent", reason)
            self._finish(
                job,
                Result(
                    job.key,
                    job.mhash,
                    "failed",
                    error=f"budget: {reason}",
                    attempts=job.attempts,
                    permanent=False,
                ),
            )
            return
        self.spent["requests"] += 1
        limit = self.api.max_tokens or UNLIMITED_TOKENS_ESTIMATE
        est = sum(len(m["content"]) for m in job.messages) // 4 + 8 + limit
        await self.limiter.acquire(est)
        job.attempts += 1
        self.counts["attempts"] += 1
        t0 = time.monotonic()
        try:
            resp = await self._client.chat.completions.create(
                model=self.api.model, messages=job.messages, **self.request
            )
        except Exception as e:
            self.limiter.settle(est, 0)
            job.elapsed_s += time.monotonic() - t0
            self._failed_attempt(job, classify(e, self.api.timeout_s))
            return
        job.elapsed_s += time.monotonic() - t0
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        if resp.usage is not None:
            usage = {
                "prompt_tokens": resp.usage.prompt_tokens or 0,
                "completion_tokens": resp.usage.completion_tokens or 0,
            }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.limiter.settle(est, usage["total_tokens"])
        cost = (
            usage["prompt_tokens"] * self.api.price_per_1k_prompt_tokens
            + usage["completion_tokens"] * self.api.price_per_1k_completion_tokens
        ) / 1000
        self.spent["tokens"] += usage["total_tokens"]
        self.spent["dollars"] += cost
        result = Result(
            job.key,
            job.mhash,
            "ok",
            usage=usage,
            latency_s=job.elapsed_s,
            cost=cost,
            attempts=job.attempts,
        )
        choice = resp.choices[0] if resp.choices else None
        text = choice.message.content if choice is not None else None
        result.text, result.finish_reason = text, choice.finish_reason if choice else None
        refusal = getattr(choice.message, "refusal", None) if choice is not None else None
        if result.finish_reason == "content_filter":
            result.status, result.error = "failed", "content filter"
        elif refusal:
            result.status, result.error = "failed", self._scrub(f"refused: {refusal[:300]}")
        elif not text or not text.strip():
            result.status, result.error = "failed", "empty content"
        if result.status == "failed":
            self.errors[result.error.split(":")[0]] += 1
            log.warning("teacher prompt %s failed permanently: %s", job.mhash, result.error)
        self._finish(job, result)

    def _failed_attempt(self, job: _Job, v: Verdict) -> None:
        reason = self._scrub(v.reason)
        job.last_error = reason
        self.errors[reason.split(":")[0].split(" (")[0]] += 1
        if v.kind == "request":  # every prompt would get it: stop, cache nothing
            reason = (
                f"the teacher endpoint rejects the request parameter {v.param!r} ({reason}); "
                f"change {rejected_param_hint(self.api, v.param)}"
            )
        if v.kind in ("fatal", "request"):
            if self._fatal is None:
                log.error("teacher fetch stopped: %s", reason)
                self._fail_all(TeacherError(reason))
            return
        if v.kind == "permanent" or job.attempts > self.api.max_retries:
            if v.kind == "retry":
                reason = f"gave up after {job.attempts} attempts; last error: {reason}"
            log.warning("teacher prompt %s failed: %s", job.mhash, reason)
            self._finish(
                job,
                Result(
                    job.key,
                    job.mhash,
                    "failed",
                    latency_s=job.elapsed_s,
                    attempts=job.attempts,
                    error=reason,
                    permanent=v.kind == "permanent",
                ),
            )
            return
        api = self.api
        delay = backoff_delay(job.attempts, api.backoff_base_s, api.backoff_max_s, v.retry_after)
        self.counts["retries"] += 1
        log.debug(
            "teacher prompt %s: %s; retry %d in %.3fs", job.mhash, reason, job.attempts, delay
        )
        asyncio.get_running_loop().call_later(delay, self._queue.put_nowait, (job.order, job))

    def stats(self) -> dict:
        """Counters of this fetcher: results, attempts, retries, errors by kind, spend."""
        return {
            **{
                k: self.counts[k]
                for k in ("submitted", "cached", "ok", "failed", "attempts", "retries")
            },
            "pending": len(self._inflight),
            "errors": dict(self.errors),
            "spent": dict(self.spent),
            "budget_stop": self.budget_stop,
        }


@ray.remote(num_cpus=0)
class TeacherFetcher:
    """Async Ray actor around :class:`Fetcher` for streaming teacher responses during training.

    The driver calls ``submit(batch_id, prompts, samples)`` for upcoming batches (returns at
    once) and ``get(batch_id)`` when it needs them, so it waits only when the API is slower than
    training.
    The key is read from the actor process's environment.
    """

    def __init__(self, api: TeacherAPIConfig | dict, cache_path: str | None = None) -> None:
        api = TeacherAPIConfig.model_validate(api)
        cache = ResponseCache(Path(cache_path)) if cache_path is not None else None
        self.fetcher = Fetcher(api, cache)
        self.batches: dict = {}

    async def start(self) -> dict:
        """Probe the endpoint; raises TeacherError (missing key, unreachable) at once."""
        await self.fetcher.start()
        return self.fetcher.stats()

    async def submit(self, batch_id, prompts: list, samples: list[int] | None = None) -> None:
        """Start fetching a batch (prompts and their sample indices) in the background."""
        if batch_id in self.batches:
            raise ValueError(f"teacher batch {batch_id!r} was already submitted")
        await self.fetcher.start()
        self.batches[batch_id] = asyncio.ensure_future(self.fetcher.fetch_many(prompts, samples))

    async def get(self, batch_id) -> list[Result]:
        """The results of a submitted batch (waits for the missing ones)."""
        if batch_id not in self.batches:
            raise ValueError(f"teacher batch {batch_id!r} was not submitted (or already taken)")
        return await self.batches.pop(batch_id)

    async def stats(self) -> dict:
        return {**self.fetcher.stats(), "batches_pending": len(self.batches)}

    async def close(self) -> None:
        await self.fetcher.aclose()
