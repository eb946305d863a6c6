"""``gad-fetch``: fill a dataset with teacher responses from an OpenAI-compatible API.

Reads the prompts of ``data.train_path`` (any source of :mod:`gad_ray.data.dataset`), asks the
teacher (``teacher.api``) for every row without a teacher response, and writes the rows, each
response added in the row's own format (other columns kept; docs/config.md "Data formats"), to
``<input stem>.teacher<suffix>`` beside a local input file, else ``<trainer.run_dir>/teacher.jsonl``.
The k-th row (in file order) with the same prompt asks for the teacher's sample k, so a prompt
that repeats gets as many independent responses (``teacher.api.dedup=true``: one, shared).
Every response is committed to ``teacher.api.cache_path`` on arrival: a killed run restarted
with the same config asks only for what is missing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from gad_ray.config import Config
from gad_ray.data.dataset import DataError, Example, load_rows, parse_example, with_response
from gad_ray.hydra_app import hydra_entry
from gad_ray.teacher.cache import ResponseCache, Result
from gad_ray.teacher.fetcher import Fetcher, TeacherError, occurrence_indices

EXIT_BUDGET = 3


def default_output(cfg: Config, input_path: str) -> Path:
    """``<stem>.teacher<suffix>`` beside a local input file, else ``<run_dir>/teacher.jsonl``."""
    path = Path(os.path.expanduser(input_path))
    if path.is_file():
        suffix = ".parquet" if path.suffix in (".parquet", ".pq") else ".jsonl"
        return path.with_name(f"{path.stem}.teacher{suffix}")
    return Path(cfg.trainer.run_dir) / "teacher.jsonl"


def read_prompts(cfg: Config, path: str) -> list[tuple[dict, Example]]:
    """``(row, example)`` for every row of ``path``; bad rows raise DataError naming the row."""
    d = cfg.data
    out = []
    for source, index, row in load_rows(path, d.format, d.split, d.limit):
        out.append(
            (row, parse_example(row, source, index, d.prompt_key, d.response_key, None, False))
        )
    return out


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write JSONL (or Parquet for a .parquet path) atomically: a temp file, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        with tmp.open("w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


async def _fetch_all(
    cfg: Config, prompts: list[list[dict]], samples: list[int]
) -> tuple[list[Result | None], dict, TeacherError | None]:
    """The results (None: none yet), the fetcher's stats, and the error that stopped the fetch
    (then the results are what the cache holds: every response paid for so far)."""
    bar = tqdm(total=len(prompts), desc="teacher", unit="prompt", dynamic_ncols=True)
    async with Fetcher(cfg.teacher.api, retry_failed=cfg.fetch.retry_failed) as fetcher:

        def on_result(r: Result) -> None:
            s = fetcher.stats()
            bar.set_postfix(
                ok=s["ok"] + s["cached"],
                failed=s["failed"],
                retries=s["retries"],
                spent=f"${s['spent']['dollars']:.4f}",
                refresh=False,
            )
            bar.update(1)

        keys = fetcher.keys(prompts, samples)
        try:
            return await fetcher.fetch_many(prompts, samples, on_result), fetcher.stats(), None
        except TeacherError as e:
            err, stats = e, fetcher.stats()
        finally:
            bar.close()
    cache = ResponseCache(cfg.teacher.api.cache_path)  # the fetcher has committed its writes
    try:
        stored = cache.get_many(keys)
    finally:
        cache.close()
    return [stored.get(k) for k in keys], stats, err


def fetch_dataset(cfg: Config, input_path: str, output_path: Path) -> dict:
    """Fetch the missing teacher responses of ``input_path`` and write ``output_path``.

    Each response is added in its row's own format (:func:`~gad_ray.data.dataset.with_response`).
    Returns a summary: rows, written, fetched, cached, failed (by reason), spend,
    ``budget_stop`` (the budget message when the budget stopped the fetch) and ``error`` (the
    :class:`TeacherError` that stopped it, or None). A stopped fetch still writes every row that
    has a response.
    """
    rows = read_prompts(cfg, input_path)
    todo = [i for i, (_, ex) in enumerate(rows) if ex.response is None]
    # counted over every row, as a teacher=api training run on this file counts them
    samples = occurrence_indices(cfg.teacher.api, [ex.messages for _, ex in rows])
    results, stats, error = asyncio.run(
        _fetch_all(cfg, [rows[i][1].messages for i in todo], [samples[i] for i in todo])
    )
    out_rows: list[dict | None] = [row if ex.response is not None else None for row, ex in rows]
    failed: Counter[str] = Counter()
    for i, r in zip(todo, results, strict=True):
        row, ex = rows[i]
        if r is not None and r.status == "ok":
            out_rows[i] = with_response(row, ex, r.text, cfg.data.response_key)
        elif r is not None:
            failed[r.error or "unknown"] += 1
    written = [row for row in out_rows if row is not None]
    write_rows(output_path, written)
    return {
        "rows": len(rows),
        "written": len(written),
        "had_response": len(rows) - len(todo),
        "fetched": stats["ok"],
        "cached": stats["cached"],
        "failed": dict(failed),
        "spent": stats["spent"],
        "budget_stop": stats["budget_stop"],
        "error": error,
    }


def fetch(cfg: Config) -> None:
    """The ``gad-fetch`` app: fetch, write, print a summary (exit 1 on errors, 3 on budget)."""
    for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    api = cfg.teacher.api
    if not api.base_url or not api.model:
        print(
            "error: gad-fetch needs teacher.api.base_url and teacher.api.model "
            "(e.g. teacher=api, or set both keys)",
            file=sys.stderr,
        )
        sys.exit(2)
    input_path = cfg.fetch.input or cfg.data.train_path
    output = Path(cfg.fetch.output) if cfg.fetch.output else default_output(cfg, input_path)
    try:
        s = fetch_dataset(cfg, input_path, output)
    except (TeacherError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, TeacherError) else 2)
    if s["error"] is not None:
        print(
            f"error: {s['error']}\ngad-fetch: stopped; the {s['written']} rows with a response "
            f"are written to {output} and every response is kept in the cache {api.cache_path}: "
            "a rerun asks only for the missing ones",
            file=sys.stderr,
        )
        sys.exit(1)
    spent = s["spent"]
    print(
        f"gad-fetch: {s['written']}/{s['rows']} rows with a teacher response -> {output} "
        f"({s['fetched']} fetched, {s['cached']} from the cache {api.cache_path}, "
        f"{s['had_response']} already in the input, {sum(s['failed'].values())} failed); "
        f"cache spend: {spent['requests']} requests, {spent['tokens']} tokens, "
        f"${spent['dollars']:.4f}"
    )
    for reason, n in sorted(s["failed"].items(), key=lambda kv: -kv[1])[:10]:
        print(f"  failed x{n}: {reason}")
    if s["budget_stop"]:
        missing = s["rows"] - s["written"]
        print(
            f"gad-fetch: stopped by the budget ({s['budget_stop']}); {missing} rows still have no "
            f"response; raise the budget and rerun to fetch only those",
            file=sys.stderr,
        )
        sys.exit(EXIT_BUDGET)


main = hydra_entry(fetch, help="fetch")

if __name__ == "__main__":
    main()
