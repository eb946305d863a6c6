"""``gad-eval``: generate with each model (and the teacher) on each eval set, judge, report.

    gad-eval 'eval.models=[{name: gad, path: outputs/gad/final}]' \\
        'eval.sets=[{preset: dolly, path: data/dolly.jsonl}]' \\
        eval.judge.base_url=https://api.openai.com/v1 eval.judge.model=gpt-4o

A model is an HF directory, a hub name, a ``tiny:`` spec, or a training checkpoint: a run dir
(its newest complete checkpoint), a step checkpoint or a role's directory in one, exported
first (merged, as ``gad-export`` does) to ``<eval.output_dir>/models/<name>`` and reused
while the checkpoint is the same.

Everything that can be checked is checked before an engine starts: the sets are read and
validated (a bad row names its file and row), model paths resolved, the judge configured.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

from gad_ray.config import Config
from gad_ray.config.schema import EvalModelSpec
from gad_ray.data.dataset import DataError
from gad_ray.eval.generate import Response, check_model, generate_api, generate_model, model_name
from gad_ray.eval.judge import JudgeError, Verdict, judge_api, judge_prompt, template_of, verdict
from gad_ray.eval.metrics import ngram_f1, rouge_l, words
from gad_ray.eval.report import markdown, write_report
from gad_ray.eval.sets import EvalSet, load_set
from gad_ray.export.convert import SOURCE_FILE, export_checkpoint, is_checkpoint, locate
from gad_ray.hydra_app import hydra_entry
from gad_ray.models.loading import ModelLoadError
from gad_ray.teacher.cache import ResponseCache
from gad_ray.teacher.fetcher import Fetcher, TeacherError, read_api_key


class EvalError(ValueError):
    """An evaluation that cannot run as configured."""


def output_dir(cfg: Config) -> Path:
    return Path(cfg.eval.output_dir or Path(cfg.trainer.run_dir) / "eval")


def prepare(cfg: Config) -> list[EvalSet]:
    """Check the whole eval config and read the sets; raise naming what is wrong."""
    ev = cfg.eval
    if ev.teacher == "api":
        for key in ("base_url", "model"):
            if not getattr(cfg.teacher.api, key):
                raise EvalError(f"eval.teacher=api needs teacher.api.{key}")
    names = [model_name(m) for m in ev.models] + ([ev.teacher_name] if ev.teacher != "none" else [])
    if not names:
        raise EvalError("nothing to evaluate: eval.models is empty and eval.teacher=none")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EvalError(f"model names {dupes} repeat; give each eval.models entry a name")
    template_of(ev.judge)
    read_api_key(judge_api(ev.judge, ""))
    sets = [load_set(s, ev.judge.reference) for s in ev.sets]
    set_names = [s.name for s in sets]
    if len(set(set_names)) != len(set_names):
        raise EvalError(f"eval set names {set_names} repeat; give each eval.sets entry a name")
    for m in ev.models:
        if is_checkpoint(m.path):
            locate(m.path)  # ExportError naming the path and what is wrong
        else:
            check_model(m)
    return sets


def exported_models(cfg: Config, out: Path) -> list[EvalModelSpec]:
    """``eval.models`` with each checkpoint replaced by its HF export (merged) under
    ``out/models/<name>``; an export already there from the same checkpoint is reused."""
    models = []
    for m in cfg.eval.models:
        if not is_checkpoint(m.path):
            models.append(m)
            continue
        name = model_name(m)
        folder = out / "models" / name
        source = folder / SOURCE_FILE
        role_dir = str(locate(m.path).role_dir)
        if not (source.is_file() and json.loads(source.read_text())["checkpoint"] == role_dir):
            print(f"exporting {role_dir} to {folder}")
            export_checkpoint(role_dir, folder, lora_export="merged", overwrite=True)
        models.append(EvalModelSpec(path=str(folder), name=name))
    return models


async def _judge_all(
    cfg: Config, cache: ResponseCache, sets: list[EvalSet], rows: dict[str, list]
) -> tuple[list[list[str | None]], dict[str, list[list[Verdict]]]]:
    """References written by the judge where a set asks for it, then every verdict."""
    judge = cfg.eval.judge
    template = template_of(judge)
    async with Fetcher(judge_api(judge, str(cache.path)), cache) as fetcher:
        refs = []
        for s in sets:
            if s.reference == "judge":
                results = await fetcher.fetch_many([it.messages for it in s.items])
                refs.append([r.text if r.status == "ok" else None for r in results])
            else:
                refs.append([it.reference for it in s.items])
        prompts, where = [], []
        verdicts: dict[str, list[list[Verdict]]] = {}
        for name, per_set in rows.items():
            verdicts[name] = [[] for _ in sets]
            for k, responses in enumerate(per_set):
                if responses is None:  # the teacher row of a set without teacher responses
                    continue
                for it, ref, resp in zip(sets[k].items, refs[k], responses, strict=True):
                    if resp.text is None or ref is None:
                        why = "no response" if resp.text is None else "no reference answer"
                        verdicts[name][k].append(Verdict(None, "failed", None, why))
                        continue
                    verdicts[name][k].append(None)  # type: ignore[arg-type]
                    prompts.append(judge_prompt(template, it.question, ref, resp.text))
                    where.append((name, k, len(verdicts[name][k]) - 1))
        results = await fetcher.fetch_many(prompts)
    for (name, k, i), r in zip(where, results, strict=True):
        verdicts[name][k][i] = verdict(r.status, r.text, r.error)
    return refs, verdicts


def _records(
    cfg: Config,
    sets: list[EvalSet],
    rows: dict[str, list[list[Response]]],
    refs: list[list[str | None]],
    verdicts: dict[str, list[list[Verdict]]],
) -> list[dict]:
    teacher_rows = rows.get(cfg.eval.teacher_name) if cfg.eval.teacher == "api" else None
    records = []
    for name, per_set in rows.items():
        for k, s in enumerate(sets):
            if per_set[k] is None:
                continue
            for i, (it, resp) in enumerate(zip(s.items, per_set[k], strict=True)):
                teacher = it.teacher if teacher_rows is None else teacher_rows[k][i].text
                v = verdicts[name][k][i]
                has_overlap = teacher is not None and resp.text is not None
                records.append(
                    {
                        "model": name,
                        "set": s.name,
                        "id": it.id,
                        "category": it.category,
                        "question": it.question,
                        "reference": refs[k][i],
                        "reference_source": s.reference,
                        "response": resp.text,
                        "words": None if resp.text is None else len(words(resp.text)),
                        "tokens": resp.tokens,
                        "finish_reason": resp.finish_reason,
                        "truncated_prompt": resp.truncated_prompt,
                        "score": v.score,
                        "judge_status": v.status,
                        "judge_reply": v.reply,
                        "judge_error": v.error or resp.error,
                        "ngram_f1": ngram_f1(resp.text, teacher, cfg.eval.ngram)
                        if has_overlap
                        else None,
                        "rouge_l": rouge_l(resp.text, teacher) if has_overlap else None,
                    }
                )
    return records


def run_eval(cfg: Config) -> list[dict]:
    """Generate, judge and write the report; return the summary rows (see :mod:`report`)."""
    sets = prepare(cfg)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    ev = cfg.eval.model_copy(update={"models": exported_models(cfg, out)})
    cache = ResponseCache(ev.cache_path or out / "api_cache.sqlite")
    try:
        rows: dict[str, list] = {}
        if ev.teacher == "api":
            rows[ev.teacher_name] = [generate_api(cfg, s.items, cache) for s in sets]
        elif ev.teacher == "set" and any(s.has_teacher for s in sets):
            rows[ev.teacher_name] = [
                [Response(it.teacher) for it in s.items] if s.has_teacher else None for s in sets
            ]
        for m in ev.models:
            rows[model_name(m)] = generate_model(cfg, m, [s.items for s in sets])
        refs, verdicts = asyncio.run(_judge_all(cfg, cache, sets, rows))
    finally:
        cache.close()
    return write_report(_records(cfg, sets, rows, refs, verdicts), out)


def evaluate(cfg: Config) -> None:
    """The ``gad-eval`` app: print the score table and where the report is."""
    for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    if not cfg.eval.sets:
        print(f"gad-eval: config for {cfg.name!r} is valid; nothing to evaluate (eval.sets=[]).")
        return
    try:
        rows = run_eval(cfg)
    except (EvalError, JudgeError, DataError, ModelLoadError, TeacherError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(markdown(rows))
    out = output_dir(cfg)
    print(f"report: {out}/results.md, results.csv, scores.png; per sample: {out}/samples.jsonl")
    problems = sum(r["unparseable"] + r["failed"] for r in rows)
    if problems:
        print(f"note: {problems} response(s) have no judge score (unparseable or failed)")


main = hydra_entry(evaluate, help="eval")

if __name__ == "__main__":
    main()
