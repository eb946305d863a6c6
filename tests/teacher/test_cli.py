import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from gad_ray.hydra_app import compose
from gad_ray.synthetic.server import start_server_thread
from gad_ray.synthetic.tasks import make_dataset, write_dataset
from gad_ray.teacher.cache import ResponseCache, messages_hash
from gad_ray.teacher.cli import EXIT_BUDGET, default_output, fetch

KEY_ENV = "GAD_RAY_TEST_TEACHER_KEY"
SECRET = "sk-gadray-CliSecretValue-9931"


def _overrides(tmp_path, base_url: str, **extra) -> list[str]:
    opts = {
        "data.train_path": str(tmp_path / "prompts.jsonl"),
        "teacher": "api",
        "teacher.api.base_url": base_url,
        "teacher.api.model": "synthetic-teacher",
        "teacher.api.api_key_env": KEY_ENV,
        "teacher.api.cache_path": str(tmp_path / "cache.sqlite"),
        "teacher.api.backoff_base_s": 0.01,
        "teacher.api.max_tokens": 32,
        **extra,
    }
    return [f"{k}={v}" for k, v in opts.items()]


def _write_prompts(tmp_path, n: int) -> list[dict]:
    rows = make_dataset(3 * n + 30, seed=3, min_len=3, max_len=8, with_teacher=False)
    rows = list({json.dumps(r["content"]): r for r in reversed(rows)}.values())[::-1][:n]
    assert len(rows) == n  # distinct prompts
    write_dataset(tmp_path / "prompts.jsonl", rows)
    return rows


def _cli(tmp_path, overrides: list[str], env_key: str | None = SECRET) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    if env_key is not None:
        env[KEY_ENV] = env_key
    cmd = [sys.executable, "-m", "gad_ray.teacher.cli", *overrides]
    cmd.append(f"hydra.run.dir={tmp_path / 'hydra'}")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill9_mid_run_then_restart_loses_nothing_and_repays_nothing(tmp_path):
    rows = _write_prompts(tmp_path, 300)
    with start_server_thread(api_key=SECRET, latency_ms=30) as server:
        overrides = _overrides(tmp_path, server.base_url, **{"teacher.api.concurrency": 4})
        proc = _cli(tmp_path, overrides)
        deadline = time.monotonic() + 60
        while server.stats()["outcomes"].get("ok", 0) < 60:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = Counter(server.stats()["per_prompt"])
        committed = {r.messages_hash for r in _cache_rows(tmp_path)}
        # the server counts a request on arrival; a few were still in flight or being committed
        assert 30 <= len(committed) < len(rows)
        assert not (tmp_path / "prompts.teacher.jsonl").exists()

        proc = _cli(tmp_path, overrides)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        after = Counter(server.stats()["per_prompt"])
        # no prompt whose response was committed before the kill was asked for again
        assert all(after[h] == before[h] for h in committed)
        # only requests in flight (asked, not yet committed) at the kill were asked again
        twice = {h for h, n in after.items() if n > 1}
        assert twice <= set(before) - committed and max(after.values()) <= 2
        assert sum(server.stats()["outcomes"].values()) == server.stats()["total_requests"]

    written = [json.loads(line) for line in (tmp_path / "prompts.teacher.jsonl").open()]
    assert [r["id"] for r in written] == [r["id"] for r in rows]  # every row, once, in order
    texts = {r.messages_hash: r.text for r in _cache_rows(tmp_path)}
    assert all(r["teacher_response"] == texts[messages_hash(r["content"])] for r in written)
    assert all(
        r["content"] == s["content"] and r["task"] == s["task"]
        for r, s in zip(written, rows, strict=True)
    )
    assert "300/300 rows with a teacher response" in out and "teacher:" in err  # summary, bar
    logs = [
        out,
        err,
        *(p.read_bytes().decode("utf-8", "replace") for p in tmp_path.rglob("*") if p.is_file()),
    ]
    assert not any(SECRET in text for text in logs if text)


def _cache_rows(tmp_path):
    cache = ResponseCache(tmp_path / "cache.sqlite")
    keys = [k for (k,) in cache.db.execute("SELECT key FROM responses")]
    rows = list(cache.get_many(keys).values())
    cache.close()
    return rows


@pytest.mark.parametrize("case", ["missing_key", "unreachable"])
def test_cli_fails_fast_with_a_clear_message(tmp_path, case):
    _write_prompts(tmp_path, 5)
    base_url = "http://127.0.0.1:9/v1"  # discard port: nothing listens there
    t0 = time.monotonic()
    proc = _cli(tmp_path, _overrides(tmp_path, base_url), None if case == "missing_key" else SECRET)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and time.monotonic() - t0 < 30
    if case == "missing_key":
        assert f"environment variable {KEY_ENV} is not set" in err
    else:
        assert "teacher endpoint http://127.0.0.1:9/v1 is unreachable" in err
        assert SECRET not in out + err
    assert "Traceback" not in err


def test_budget_stop_writes_partial_output_and_exits_3(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, SECRET)
    rows = _write_prompts(tmp_path, 40)
    with start_server_thread() as server:
        budget = {"teacher.api.budget.max_requests": 10, "teacher.api.concurrency": 2}
        cfg = compose(_overrides(tmp_path, server.base_url, **budget), run_dir=str(tmp_path))
        with pytest.raises(SystemExit) as exit_:
            fetch(cfg)
        assert exit_.value.code == EXIT_BUDGET and server.stats()["total_requests"] == 10
    written = [json.loads(line) for line in default_output(cfg, cfg.data.train_path).open()]
    assert len(written) == 10 and [r["id"] for r in written] == [r["id"] for r in rows[:10]]
    err = capsys.readouterr().err
    assert "stopped by the budget (teacher.api.budget.max_requests=10 reached)" in err
    assert f"{len(rows) - 10} rows still have no response" in err


def test_responses_are_written_in_each_rows_format(tmp_path, monkeypatch):
    """TRL prompt-only rows (messages, prompt as a string or messages), the authors' content
    rows, and a row that already has its response: the output keeps every row's format and
    reads back (no key mapping) as the same prompts with the teacher's responses."""
    from gad_ray.config.schema import DataConfig
    from gad_ray.data.dataset import load_examples

    monkeypatch.setenv(KEY_ENV, SECRET)
    texts = [r["content"][0]["content"] for r in _write_prompts(tmp_path, 5)]
    user = [{"role": "user", "content": t} for t in texts]
    rows = [
        {"id": "m", "messages": [user[0]]},
        {"id": "p", "prompt": texts[1]},
        {"id": "pm", "prompt": [user[2]]},
        {"id": "c", "content": texts[3]},
        {"id": "done", "prompt": texts[4], "completion": "given"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with start_server_thread() as server:
        overrides = _overrides(tmp_path, server.base_url, **{"data.train_path": str(path)})
        cfg = compose(overrides, run_dir=str(tmp_path))
        fetch(cfg)
        assert server.stats()["total_requests"] == 4  # the row with a response asks nothing
    out = [json.loads(line) for line in (tmp_path / "mixed.teacher.jsonl").open()]
    answers = {r.messages_hash: r.text for r in _cache_rows(tmp_path)}
    got = [answers[messages_hash([u])] for u in user[:4]]
    assert out == [
        {"id": "m", "messages": [user[0], {"role": "assistant", "content": got[0]}]},
        {"id": "p", "prompt": texts[1], "completion": got[1]},
        {"id": "pm", "prompt": [user[2]], "completion": [{"role": "assistant", "content": got[2]}]},
        {"id": "c", "content": texts[3], "teacher_response": got[3]},
        rows[4],
    ]
    examples, _ = load_examples(DataConfig(train_path=str(tmp_path / "mixed.teacher.jsonl")))
    assert [e.messages for e in examples] == [[u] for u in user]
    assert [e.response for e in examples] == [*got, "given"]
