import sqlite3

import pytest

from gad_ray.synthetic.server import prompt_hash
from gad_ray.teacher.cache import ResponseCache, Result, messages_hash, request_key

MSGS = [{"role": "user", "content": "Reverse the words: a b c"}]
PARAMS = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 64}


def _ok(key: str, text: str = "c b a") -> Result:
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    return Result(key, messages_hash(MSGS), "ok", text, "stop", usage, 0.25, 0.002, 2)


def test_put_get_roundtrip_survives_reopen(tmp_path):
    path = tmp_path / "c.sqlite"
    cache = ResponseCache(path)
    key = request_key("m", MSGS, PARAMS)
    cache.put(_ok(key), "m", MSGS, PARAMS)
    failed = Result("k2", "h2", "failed", error="empty content", attempts=1)
    cache.put(failed, "m", MSGS, PARAMS)
    assert cache.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # a second connection (another process) sees the row without any close/flush
    other = sqlite3.connect(path)
    assert other.execute("SELECT text FROM responses WHERE key=?", (key,)).fetchone() == ("c b a",)
    other.close()
    cache.close()
    again = ResponseCache(path)
    got = again.get(key)
    assert got is not None and got.cached and got.status == "ok" and got.text == "c b a"
    assert got.usage == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert (got.latency_s, got.cost, got.attempts, got.finish_reason) == (0.25, 0.002, 2, "stop")
    assert again.get("k2").error == "empty content"
    assert again.get("missing") is None
    assert again.totals() == {
        "rows": 2,
        "ok": 1,
        "failed": 1,
        "requests": 3,
        "tokens": 8,
        "dollars": 0.002,
    }
    assert len(again) == 2


def test_put_replaces_and_get_many_handles_large_batches(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    keys = [f"k{i}" for i in range(1200)]
    cache.put_many([(_ok(k, text=k), "m", MSGS, PARAMS) for k in keys])  # one transaction
    cache.put(_ok("k7", text="newer"), "m", MSGS, PARAMS)
    found = cache.get_many(keys + ["k7", "nope"])
    assert len(found) == 1200 and found["k7"].text == "newer" and found["k1199"].text == "k1199"


def test_request_key_depends_on_model_messages_and_params():
    base = request_key("m", MSGS, PARAMS)
    assert base == request_key("m", [dict(MSGS[0])], dict(reversed(PARAMS.items())))
    assert base != request_key("m2", MSGS, PARAMS)
    assert base != request_key("m", [{"role": "user", "content": "other"}], PARAMS)
    assert base != request_key("m", MSGS, {**PARAMS, "temperature": 0.5})
    # each sample index is its own key; sample 0 is the key without one
    samples = [request_key("m", MSGS, PARAMS, k) for k in range(3)]
    assert samples[0] == base and len(set(samples)) == 3
    with pytest.raises(ValueError, match="sample index must be >= 0"):
        request_key("m", MSGS, PARAMS, -1)
    # the messages hash is the synthetic server's per-prompt key
    assert messages_hash(MSGS) == prompt_hash(MSGS)


def test_not_a_database_names_the_file(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="bad.sqlite"):
        ResponseCache(bad)
