import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter

import openai
import pytest

from gad_ray.eval.judge import DEFAULT_TEMPLATE, judge_prompt, parse_rating
from gad_ray.synthetic.judge import NO_RATING_MARKER
from gad_ray.synthetic.server import (
    UNKNOWN_PROMPT_ANSWER,
    RunningServer,
    ServerConfig,
    main,
    prompt_hash,
    start_server_thread,
)
from gad_ray.synthetic.tasks import FRUITS, TASKS, make_prompt, teacher_answer


def client(server: RunningServer, **kw) -> openai.OpenAI:
    kw.setdefault("api_key", "unused")
    kw.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=server.base_url, **kw)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("task", sorted(TASKS))
def test_chat_completion_returns_teacher_answer(server: RunningServer, task: str) -> None:
    prompt = make_prompt(task, random.Random(7), 4)
    messages = [{"role": "system", "content": "You are helpful."}, *user(prompt)]
    r = client(server).chat.completions.create(model="m", messages=messages, temperature=0)
    assert r.object == "chat.completion" and r.model == "synthetic-teacher" and r.id
    [choice] = r.choices
    assert choice.index == 0 and choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == teacher_answer(prompt, None)
    answer_tokens = len(choice.message.content.split())
    assert r.usage.completion_tokens == answer_tokens
    assert r.usage.prompt_tokens == 3 + len(prompt.split())
    assert r.usage.total_tokens == r.usage.prompt_tokens + answer_tokens
    event = server.stats()["events"][-1]
    assert event["outcome"] == "ok" and event["completion_tokens"] == answer_tokens
    assert event["prompt_hash"] == prompt_hash(messages)


def test_framed_teacher_answers_in_its_style_with_its_preferences() -> None:
    with start_server_thread(seed=0, style="framed") as framed:
        c = client(framed)
        r = c.chat.completions.create(
            model="m", messages=user("Uppercase the words: cat dog"), temperature=0
        )
        assert r.choices[0].message.content == "Answer: CAT DOG."
        r = c.chat.completions.create(model="m", messages=user("Name a fruit that is red."), n=100)
        answers = Counter(ch.message.content for ch in r.choices)
    assert set(answers) <= {f"Answer: {a}." for a in FRUITS["red"]}
    assert answers.most_common(1)[0][0] == "Answer: apple."


def test_n_choices_and_multimodal_distribution(server: RunningServer) -> None:
    c = client(server)
    r = c.chat.completions.create(model="m", messages=user("Reverse the words: a b c"), n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert {ch.message.content for ch in r.choices} == {"c b a"}
    counts: Counter[str] = Counter()
    for _ in range(2):
        r = c.chat.completions.create(model="m", messages=user("Name a fruit that is red."), n=100)
        counts.update(ch.message.content for ch in r.choices)
    assert set(counts) == set(FRUITS["red"])
    assert counts.most_common(1)[0][0] == "apple"
    r = c.chat.completions.create(
        model="m", messages=user("Name a fruit that is red."), n=50, temperature=0
    )
    assert {ch.message.content for ch in r.choices} == {"apple"}


def test_seed_makes_samples_reproducible(server: RunningServer) -> None:
    c = client(server)

    def draw(seed: int) -> list[str]:
        messages = user("Give a synonym of big.")
        r = c.chat.completions.create(model="m", messages=messages, n=20, seed=seed)
        return [ch.message.content for ch in r.choices]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_max_tokens_truncates_with_finish_reason_length(server: RunningServer) -> None:
    c = client(server)
    messages = user("Copy the words: cat dog sun moon")
    r = c.chat.completions.create(model="m", messages=messages, max_tokens=2)
    assert r.choices[0].message.content == "cat dog"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    r = c.chat.completions.create(model="m", messages=messages, max_completion_tokens=4, top_p=0.5)
    assert r.choices[0].message.content == "cat dog sun moon"
    assert r.choices[0].finish_reason == "stop"


def test_unknown_prompt_gets_polite_answer(server: RunningServer) -> None:
    r = client(server).chat.completions.create(model="m", messages=user("What is love?"))
    assert r.choices[0].message.content == UNKNOWN_PROMPT_ANSWER
    assert server.stats()["outcomes"] == {"unknown_prompt": 1}


def test_fault_on_unknown_prompt_is_recorded_as_the_fault() -> None:
    with start_server_thread(faults={"500": 1.0}) as server:
        with pytest.raises(openai.InternalServerError):
            client(server).chat.completions.create(model="m", messages=user("What is love?"))
        assert server.stats()["outcomes"] == {"500": 1}


@pytest.mark.parametrize(
    ("question", "answer", "rating"),
    [
        ("Reverse the words: cat dog sun", "sun dog cat", 10),
        ("Name a fruit that is red.", "cherry", 7),  # valid, not the most probable
        ("Add the numbers: 1 2", "4", 1),
        ("Sort the numbers: 3 1 2 4", "1 2 4", 4),  # word F1 6/7 with "1 2 3 4"
        ("What is love?", "Baby don't hurt me", 10),  # no task: against the reference
        ("What is love?", "A feeling", 1),
    ],
)
def test_judge_prompt_gets_a_deterministic_rating(
    server: RunningServer, question: str, answer: str, rating: int
) -> None:
    prompt = judge_prompt(DEFAULT_TEMPLATE, question, "Baby don't hurt me", answer)
    messages = [{"role": "system", "content": "You are a helpful assistant."}, *user(prompt)]
    c = client(server)
    replies = [
        c.chat.completions.create(model="m", messages=messages, temperature=t)
        .choices[0]
        .message.content
        for t in (0.0, 1.0)
    ]
    assert replies[0] == replies[1] and replies[0].endswith(f"Rating: [[{rating}]]")
    assert parse_rating(replies[0]) == rating
    assert server.stats()["outcomes"] == {"ok": 2}


def test_judge_prompt_with_the_marker_gets_no_rating(server: RunningServer) -> None:
    prompt = judge_prompt(DEFAULT_TEMPLATE, f"Copy the words: cat {NO_RATING_MARKER}", "cat", "cat")
    r = client(server).chat.completions.create(model="m", messages=user(prompt))
    assert r.choices[0].message.content and parse_rating(r.choices[0].message.content) is None


def test_models_endpoint(server: RunningServer) -> None:
    assert [m.id for m in client(server).models.list()] == ["synthetic-teacher"]


def test_bad_requests_get_400_with_openai_error_body(server: RunningServer) -> None:
    url = server.base_url + "/chat/completions"
    status, body = post(url, json.dumps({"model": "m"}).encode())
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "'messages' must be a non-empty list" in body["error"]["message"]
    status, body = post(url, b"{not json")
    assert status == 400
    for bad in ({"n": 0}, {"temperature": 3}, {"max_tokens": -1}, {"seed": "x"}):
        status, body = post(
            url, json.dumps({"messages": user("Add the numbers: 1"), **bad}).encode()
        )
        assert status == 400 and repr(next(iter(bad.values()))) in body["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="has no user message"):
        client(server).chat.completions.create(
            model="m", messages=[{"role": "system", "content": "x"}]
        )
    assert server.stats()["outcomes"] == {"bad_request": 7}


def test_api_key_is_required_when_configured() -> None:
    with start_server_thread(api_key="sekret") as server:
        for key in ("wrong", "sekret2"):
            with pytest.raises(openai.AuthenticationError):
                client(server, api_key=key).chat.completions.create(
                    model="m", messages=user("Add the numbers: 1 2")
                )
        with pytest.raises(openai.AuthenticationError):
            client(server).models.list()
        ok = client(server, api_key="sekret")
        assert (
            ok.chat.completions.create(model="m", messages=user("Add the numbers: 1 2"))
            .choices[0]
            .message.content
            == "3"
        )
        assert server.stats()["outcomes"] == {"unauthorized": 2, "ok": 1}


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("429", openai.RateLimitError),
        ("500", openai.InternalServerError),
        ("timeout", openai.APITimeoutError),
        ("drop", openai.APIConnectionError),
        ("malformed", json.JSONDecodeError),
    ],
)
def test_each_injected_fault_is_observable(fault: str, error: type[Exception]) -> None:
    with start_server_thread(faults={fault: 1.0}, hang_s=5, retry_after_s=2) as server:
        c = client(server, timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(error) as info:
            c.chat.completions.create(model="m", messages=user("Add the numbers: 1 2"))
        assert time.monotonic() - t0 < 3
        if fault == "429":
            assert info.value.response.headers["retry-after"] == "2"
        assert server.stats()["outcomes"] == {fault: 1}
        assert server.stats()["events"][0]["completion_tokens"] == 0


def test_empty_fault_returns_empty_content() -> None:
    with start_server_thread(faults={"empty": 1.0}) as server:
        r = client(server).chat.completions.create(model="m", messages=user("Add the numbers: 1"))
        assert r.choices[0].message.content == "" and r.usage.completion_tokens == 0
        assert server.stats()["outcomes"] == {"empty": 1}


def test_random_faults_are_seeded_and_counted() -> None:
    with start_server_thread(faults={"500": 0.3, "empty": 0.2}, seed=11) as server:
        c = client(server)

        def run() -> list[str]:
            outcomes = []
            for i in range(60):
                try:
                    r = c.chat.completions.create(model="m", messages=user(f"Add the numbers: {i}"))
                    outcomes.append("empty" if r.choices[0].message.content == "" else "ok")
                except openai.InternalServerError:
                    outcomes.append("500")
            return outcomes

        first = run()
        stats = server.stats()
        assert stats["total_requests"] == 60 and stats["outcomes"] == dict(Counter(first))
        assert 8 <= stats["outcomes"]["500"] <= 30 and 4 <= stats["outcomes"]["empty"] <= 22
        server.reset()
        assert server.stats()["total_requests"] == 0
        assert run() == first


def test_fail_first_fails_each_prompt_k_times() -> None:
    with start_server_thread(fail_first=2, fail_first_fault="429", retry_after_s=0.05) as server:
        c = client(server)
        for prompt in ("Add the numbers: 1 2", "Copy the words: a b"):
            for _ in range(2):
                with pytest.raises(openai.RateLimitError):
                    c.chat.completions.create(model="m", messages=user(prompt))
            r = c.chat.completions.create(model="m", messages=user(prompt))
            assert r.choices[0].message.content == teacher_answer(prompt)
        stats = server.stats()
        assert stats["outcomes"] == {"429": 4, "ok": 2}
        assert stats["per_prompt"] == {
            prompt_hash(user("Add the numbers: 1 2")): 3,
            prompt_hash(user("Copy the words: a b")): 3,
        }
        server.reset()
        retrying = client(server, max_retries=2)
        r = retrying.chat.completions.create(model="m", messages=user("Add the numbers: 5 5"))
        assert r.choices[0].message.content == "10"
        assert server.stats()["outcomes"] == {"429": 2, "ok": 1}


def test_rpm_limit_answers_429() -> None:
    with start_server_thread(rpm=3) as server:
        c = client(server)
        for _ in range(3):
            c.chat.completions.create(model="m", messages=user("Add the numbers: 1"))
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(model="m", messages=user("Add the numbers: 1"))
        assert 1 <= int(info.value.response.headers["retry-after"]) <= 60
        assert server.stats()["outcomes"] == {"ok": 3, "rate_limited": 1}


def test_latency_and_stats_timestamps() -> None:
    with start_server_thread(latency_ms=150, jitter_ms=20) as server:
        c = client(server)
        t0 = time.time()
        for _ in range(3):
            c.chat.completions.create(model="m", messages=user("Add the numbers: 1"))
        assert time.time() - t0 >= 3 * 0.13
        times = [e["t"] for e in server.stats()["events"]]
        assert times == sorted(times) and t0 <= times[0] and times[-1] - times[0] >= 2 * 0.13


def test_stats_and_reset_over_http(server: RunningServer) -> None:
    client(server).chat.completions.create(model="m", messages=user("Add the numbers: 1"))
    with urllib.request.urlopen(server.root_url + "/stats", timeout=5) as r:
        stats = json.loads(r.read())
    assert stats["total_requests"] == 1 and stats["outcomes"] == {"ok": 1}
    assert stats["per_prompt"] == {prompt_hash(user("Add the numbers: 1")): 1}
    assert set(stats["events"][0]) == {"t", "prompt_hash", "outcome", "completion_tokens"}
    assert post(server.root_url + "/stats/reset", b"") == (200, {"reset": True})
    assert server.stats()["total_requests"] == 0


def test_config_and_cli_validation(capsys) -> None:
    with pytest.raises(ValueError, match="unknown fault 'boom'"):
        ServerConfig(faults={"boom": 0.1})
    with pytest.raises(ValueError, match="sum to more than 1"):
        ServerConfig(faults={"500": 0.7, "429": 0.5})
    with pytest.raises(ValueError, match="rpm must be >= 1"):
        ServerConfig(rpm=0)
    with pytest.raises(ValueError, match="unknown answer style 'bold'"):
        ServerConfig(style="bold")
    with pytest.raises(SystemExit):
        main(["--api-key-env", "GAD_SYNTHETIC_UNSET_KEY_9F3A"])
    assert (
        "GAD_SYNTHETIC_UNSET_KEY_9F3A: that environment variable is not set"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["--p-500", "1.5"])
    assert "fault probability 500=1.5 is not in [0, 1]" in capsys.readouterr().err


def test_cli_serves_with_api_key_from_env() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GAD_SYNTHETIC_CLI_KEY": "k123"}
    cmd = [sys.executable, "-m", "gad_ray.synthetic.server", "--port", str(port)]
    cmd += ["--api-key-env", "GAD_SYNTHETIC_CLI_KEY", "--model", "cli-teacher"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert f"synthetic teacher on http://127.0.0.1:{port}/v1" in proc.stdout.readline()
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k123", max_retries=5)
        r = c.chat.completions.create(model="m", messages=user("Sort the numbers: 3 1 2"))
        assert r.model == "cli-teacher" and r.choices[0].message.content == "1 2 3"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
