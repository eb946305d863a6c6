"""OpenAI-compatible HTTP server for the synthetic teacher, with seeded fault injection.

Routes: POST /v1/chat/completions, GET /v1/models, GET /stats, POST /stats/reset.
A judge prompt in the format of :mod:`gad_ray.eval.judge` gets a deterministic judge reply (see
:func:`~gad_ray.synthetic.judge.judge_reply`) instead of a teacher answer.
`start_server_thread(**opts)` runs it on a free loopback port in a background thread (tests);
`gad-teacher-server` (`main`) runs it in the foreground.
"""

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TypeVar

from aiohttp import web

from gad_ray.synthetic.judge import judge_reply
from gad_ray.synthetic.tasks import (
    STYLES,
    prompt_text,
    teacher_answer,
)

T = TypeVar("T")

FAULTS = ("429", "500", "timeout", "drop", "malformed", "empty")
UNKNOWN_PROMPT_ANSWER = "Sorry, I can only answer the synthetic tasks I was built for."


@dataclass
class ServerConfig:
    """Server options; `faults` maps a name in FAULTS to its per-request probability."""

    model: str = "synthetic-teacher"
    api_key: str | None = None
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    faults: dict[str, float] = field(default_factory=dict)
    retry_after_s: float = 1.0
    hang_s: float = 120.0
    fail_first: int = 0
    fail_first_fault: str = "500"
    rpm: int | None = None
    seed: int = 0
    # request fields answered with OpenAI's 400 for an unsupported parameter (`param` set)
    reject_params: tuple[str, ...] = ()
    record_requests: bool = False  # keep each request's headers and JSON body: requests()
    style: str = "plain"  # the teacher's answer style, a key of tasks.STYLES

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"unknown answer style {self.style!r}; known: {sorted(STYLES)}")
        for name, p in self.faults.items():
            if name not in FAULTS:
                raise ValueError(f"unknown fault {name!r}; known: {FAULTS}")
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"fault probability {name}={p} is not in [0, 1]")
        if sum(self.faults.values()) > 1.0 + 1e-9:
            raise ValueError(f"fault probabilities sum to more than 1: {self.faults}")
        if self.fail_first_fault not in FAULTS:
            raise ValueError(f"unknown fail_first_fault {self.fail_first_fault!r}; known: {FAULTS}")
        for key in ("latency_ms", "jitter_ms", "retry_after_s", "hang_s", "fail_first"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.rpm is not None and self.rpm < 1:
            raise ValueError(f"rpm must be >= 1, got {self.rpm}")


def prompt_hash(messages: list[dict]) -> str:
    """Stable short hash of a message list (the key of /stats per_prompt)."""
    blob = json.dumps(messages, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ServerState:
    """Seeded random streams, per-prompt attempt counters and request statistics."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        seed = self.cfg.seed
        self.fault_rng = random.Random(f"faults-{seed}")
        self.answer_rng = random.Random(f"answers-{seed}")
        self.latency_rng = random.Random(f"latency-{seed}")
        self.attempts: Counter[str] = Counter()
        self.admitted: deque[float] = deque()
        self.outcomes: Counter[str] = Counter()
        self.per_prompt: Counter[str] = Counter()
        self.events: list[dict] = []
        self.requests: list[dict] = []

    def record(self, t: float, phash: str | None, outcome: str, tokens: int = 0) -> None:
        self.outcomes[outcome] += 1
        if phash is not None:
            self.per_prompt[phash] += 1
        self.events.append(
            {"t": t, "prompt_hash": phash, "outcome": outcome, "completion_tokens": tokens}
        )

    def snapshot(self) -> dict:
        return {
            "total_requests": len(self.events),
            "outcomes": dict(self.outcomes),
            "per_prompt": dict(self.per_prompt),
            "events": [dict(e) for e in self.events],
        }

    def rate_limited(self, now: float) -> float | None:
        """Seconds until a slot frees up if the --rpm window is full, else None (and admit)."""
        if self.cfg.rpm is None:
            return None
        while self.admitted and self.admitted[0] <= now - 60.0:
            self.admitted.popleft()
        if len(self.admitted) >= self.cfg.rpm:
            return self.admitted[0] + 60.0 - now
        self.admitted.append(now)
        return None

    def pick_fault(self, phash: str) -> str | None:
        """fail_first fault for a prompt's first k attempts, else a seeded random draw."""
        self.attempts[phash] += 1
        if self.attempts[phash] <= self.cfg.fail_first:
            return self.cfg.fail_first_fault
        u = self.fault_rng.random()
        for name in FAULTS:
            u -= self.cfg.faults.get(name, 0.0)
            if u < 0:
                return name
        return None

    def latency_s(self) -> float:
        jitter = self.latency_rng.uniform(-self.cfg.jitter_ms, self.cfg.jitter_ms)
        return max(0.0, self.cfg.latency_ms + jitter) / 1000.0


@dataclass
class ChatRequest:
    messages: list[dict]
    n: int
    temperature: float
    max_tokens: int | None
    seed: int | None


STATE = web.AppKey("state", ServerState)


def _error(
    status: int, message: str, etype: str, headers: dict | None = None, param: str | None = None
) -> web.Response:
    code = "unsupported_parameter" if param is not None else str(status)
    body = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _authorized(request: web.Request, cfg: ServerConfig) -> bool:
    return cfg.api_key is None or request.headers.get("Authorization") == f"Bearer {cfg.api_key}"


def _message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise ValueError(f"message content must be a string or a list of parts, got {content!r}")


def parse_chat_request(body: object) -> ChatRequest:
    """Validate a chat completion body; ValueError names the offending key and value."""
    if not isinstance(body, dict):
        raise ValueError(f"request body must be a JSON object, got {type(body).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list, got {messages!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be an object with role and content, got {m!r}")
    norm = [{"role": m["role"], "content": _message_text(m)} for m in messages]
    if not any(m["role"] == "user" for m in norm):
        raise ValueError("'messages' has no user message")
    n = 1 if body.get("n") is None else body["n"]
    if not isinstance(n, int) or not 1 <= n <= 128:
        raise ValueError(f"'n' must be an integer in [1, 128], got {n!r}")
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise ValueError(f"'temperature' must be a number in [0, 2], got {temperature!r}")
    max_tokens = body.get("max_completion_tokens")
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"'max_tokens' must be a positive integer, got {max_tokens!r}")
    seed = body.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise ValueError(f"'seed' must be an integer, got {seed!r}")
    return ChatRequest(norm, n, float(temperature), max_tokens, seed)


def _choices(
    req: ChatRequest, rng: random.Random, fault: str | None, style: str = "plain"
) -> tuple[list[dict], str]:
    """The response choices and the outcome name ("ok", "unknown_prompt" or the fault)."""
    prompt = prompt_text(req.messages)
    judged = judge_reply(prompt)
    outcome = fault or "ok"
    choices = []
    for i in range(req.n):
        if fault == "empty":
            text = ""
        elif judged is not None:
            text = judged
        else:
            try:
                text = teacher_answer(prompt, rng, req.temperature, style)
            except ValueError:
                text = UNKNOWN_PROMPT_ANSWER
                outcome = fault or "unknown_prompt"
        words, finish = text.split(), "stop"
        if req.max_tokens is not None and len(words) > req.max_tokens:
            text, finish = " ".join(words[: req.max_tokens]), "length"
        message = {"role": "assistant", "content": text}
        choices.append({"index": i, "message": message, "finish_reason": finish})
    return choices, outcome


async def chat_completions(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    cfg = st.cfg
    now = time.time()
    if not _authorized(request, cfg):
        st.record(now, None, "unauthorized")
        return _error(401, "Invalid or missing API key.", "invalid_request_error")
    try:
        raw = await request.json()
        if cfg.record_requests:
            headers = {k.lower(): v for k, v in request.headers.items()}
            st.requests.append({"headers": headers, "body": raw})
        req = parse_chat_request(raw)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        st.record(now, None, "bad_request")
        return _error(400, f"Invalid request: {e}", "invalid_request_error")
    rejected = [p for p in cfg.reject_params if p in raw]
    if rejected:
        st.record(now, None, "rejected_param")
        message = f"Unsupported parameter: '{rejected[0]}' is not supported with this model."
        return _error(400, message, "invalid_request_error", param=rejected[0])
    phash = prompt_hash(req.messages)
    wait = st.rate_limited(now)
    if wait is not None:
        st.record(now, phash, "rate_limited")
        headers = {"Retry-After": str(max(1, math.ceil(wait)))}
        return _error(429, f"Rate limit of {cfg.rpm} requests/min.", "rate_limit_error", headers)
    fault = st.pick_fault(phash)
    rng = st.answer_rng if req.seed is None else random.Random(f"{req.seed}-{phash}")
    choices, outcome = _choices(req, rng, fault, cfg.style)
    tokens = sum(len(c["message"]["content"].split()) for c in choices)
    st.record(now, phash, outcome, tokens if outcome in ("ok", "unknown_prompt") else 0)
    await asyncio.sleep(st.latency_s() + (cfg.hang_s if fault == "timeout" else 0.0))
    if fault == "429":
        headers = {"Retry-After": f"{cfg.retry_after_s:g}"}
        return _error(429, "Rate limit reached (injected).", "rate_limit_error", headers)
    if fault == "500":
        return _error(500, "Internal server error (injected).", "server_error")
    if fault == "drop":
        request.transport.close()
        return web.Response()
    if fault == "malformed":
        return web.Response(
            body=b'{"id": "chatcmpl-broken", "choi', content_type="application/json"
        )
    prompt_tokens = sum(len(m["content"].split()) for m in req.messages)
    body = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(now),
        "model": cfg.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": tokens,
            "total_tokens": prompt_tokens + tokens,
        },
    }
    return web.json_response(body)


async def models(request: web.Request) -> web.Response:
    cfg = request.app[STATE].cfg
    if not _authorized(request, cfg):
        return _error(401, "Invalid or missing API key.", "invalid_request_error")
    model = {"id": cfg.model, "object": "model", "created": 0, "owned_by": "gad-ray"}
    return web.json_response({"object": "list", "data": [model]})


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].snapshot())


async def stats_reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return web.json_response({"reset": True})


def make_app(cfg: ServerConfig) -> web.Application:
    """The aiohttp application serving the synthetic teacher with `cfg`."""
    app = web.Application()
    app[STATE] = ServerState(cfg)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
    app.router.add_post("/stats/reset", stats_reset)
    return app


class RunningServer:
    """A server running in a background thread with its own event loop."""

    def __init__(self, cfg: ServerConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.cfg = cfg
        self.app = make_app(cfg)
        self.loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(
            self.app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None
        )
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(host, port), name="synthetic-teacher", daemon=True
        )
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise RuntimeError(f"synthetic teacher failed to start: {self._error}") from self._error

    def _run(self, host: str, port: int) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, host, port)
            self.loop.run_until_complete(site.start())
            self.host, self.port = self._runner.addresses[0][:2]
        except BaseException as e:  # reported to the starting thread
            self._error = e
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._runner.cleanup())
        self.loop.close()

    @property
    def base_url(self) -> str:
        """OpenAI base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _call(self, fn: Callable[[], T]) -> T:
        async def wrapped() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout=10)

    def stats(self) -> dict:
        """Snapshot of the /stats JSON."""
        return self._call(self.app[STATE].snapshot)

    def requests(self) -> list[dict]:
        """The recorded requests (``record_requests``): ``{"headers"`` (lower-case names),
        ``"body"}`` each."""
        return self._call(lambda: [dict(r) for r in self.app[STATE].requests])

    def reset(self) -> None:
        """Clear stats, fail_first counters and re-seed the random streams."""
        self._call(self.app[STATE].reset)

    def stop(self) -> None:
        """Stop serving and join the thread (idempotent)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server_thread(host: str = "127.0.0.1", port: int = 0, **opts) -> RunningServer:
    """Start a server with ServerConfig(**opts) on host:port (0 = a free port) in a thread."""
    return RunningServer(ServerConfig(**opts), host, port)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point `gad-teacher-server`."""
    ap = argparse.ArgumentParser(description="OpenAI-compatible synthetic teacher server.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default="synthetic-teacher")
    ap.add_argument("--api-key-env", default=None, help="env var holding the required API key")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="mean added latency")
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +- jitter on latency")
    for name in FAULTS:
        ap.add_argument(f"--p-{name}", type=float, default=0.0, help=f"probability of {name}")
    ap.add_argument("--retry-after-s", type=float, default=1.0, help="Retry-After on 429")
    ap.add_argument("--hang-s", type=float, default=120.0, help="sleep of a 'timeout' fault")
    ap.add_argument("--fail-first", type=int, default=0, help="faults per distinct prompt")
    ap.add_argument("--fail-first-fault", default="500", choices=FAULTS)
    ap.add_argument("--rpm", type=int, default=None, help="server-side requests/min limit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--reject-param", action="append", default=[], help="answer 400 (param set) to this field"
    )
    ap.add_argument(
        "--style", default="plain", choices=sorted(STYLES), help="the teacher's answer style"
    )
    args = ap.parse_args(argv)
    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            ap.error(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    faults = {n: getattr(args, f"p_{n}") for n in FAULTS if getattr(args, f"p_{n}") > 0}
    try:
        cfg = ServerConfig(
            model=args.model,
            api_key=api_key,
            latency_ms=args.latency_ms,
            jitter_ms=args.jitter_ms,
            faults=faults,
            retry_after_s=args.retry_after_s,
            hang_s=args.hang_s,
            fail_first=args.fail_first,
            fail_first_fault=args.fail_first_fault,
            rpm=args.rpm,
            seed=args.seed,
            reject_params=tuple(args.reject_param),
            style=args.style,
        )
    except ValueError as e:
        ap.error(str(e))
    shown = {k: v for k, v in asdict(cfg).items() if k != "api_key"}
    print(f"synthetic teacher on http://{args.host}:{args.port}/v1 {shown}", flush=True)
    web.run_app(make_app(cfg), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
