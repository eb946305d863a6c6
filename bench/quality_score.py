"""Scoring for bench/quality.py: each student generates with vLLM, the synthetic checker scores.

Per split (``id``: the distillation families; ``ood``: the held-out ones), over greedy responses:

- ``score``: correct content in the teacher's style (``Answer: <valid answer>.``): what the
  teacher would write, the headline metric (docs/quality.md);
- ``accuracy``: correct content in any style (what the student knows);
- ``framed``: share of responses in the teacher's style (style transfer);
- ``f1``: unigram F1 with the teacher's reference response (docs/algorithms.md §5.4);
- ``len_ratio``: mean response tokens / mean teacher tokens;
- ``acc/<family>``, ``framed/<family>``;

and over ``k`` samples at T=1 per prompt of a multi-modal family, the shares of the teacher's
most probable answer (``top``), of another valid one (``minor``) and of invalid ones.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM

from gad_ray.config.schema import Config
from gad_ray.data.dataset import load_examples
from gad_ray.data.tokenize import TokenizedExample, tokenize_examples
from gad_ray.driver.setup import cpus_per_actor
from gad_ray.eval.metrics import ngram_f1
from gad_ray.models.loading import load_tokenizer
from gad_ray.rollout import RolloutGroup, SamplingParams, send_weights
from gad_ray.synthetic.tasks import TASKS, check, prompt_text, teacher_answer

MAX_TOKENS = 32  # above every teacher answer of the testbed (truncation counts as wrong)
SPLITS = ("id", "ood")


def score_texts(
    examples: list[TokenizedExample],
    texts: list[str],
    lengths: list[int],
    sampled: dict[str, list[str]],
) -> dict[str, float]:
    """The metrics of one split from greedy ``texts`` and T=1 ``sampled`` (prompt -> texts)."""
    verdicts = [check(prompt_text(e.messages), t) for e, t in zip(examples, texts, strict=True)]
    teacher_len = sum(len(e.response_ids) for e in examples) / len(examples)
    row = {
        "score": statistics.mean(v.correct and v.framed for v in verdicts),
        "accuracy": statistics.mean(v.correct for v in verdicts),
        "framed": statistics.mean(v.framed for v in verdicts),
        "f1": statistics.mean(
            ngram_f1(t, e.response) for t, e in zip(texts, examples, strict=True)
        ),
        "len_ratio": statistics.mean(lengths) / teacher_len,
    }
    for task in sorted({v.task for v in verdicts}):
        mine = [v for v in verdicts if v.task == task]
        row[f"acc/{task}"] = statistics.mean(v.correct for v in mine)
        row[f"framed/{task}"] = statistics.mean(v.framed for v in mine)
    shares = [check(p, r) for p, rs in sampled.items() for r in rs]
    if shares:
        row["top"] = statistics.mean(v.most_probable for v in shares)
        row["minor"] = statistics.mean(v.valid and not v.most_probable for v in shares)
        row["invalid"] = statistics.mean(not v.valid for v in shares)
    return row


def load_split(cfg: Config, tokenizer: Any, path: Path) -> list[TokenizedExample]:
    """The examples of an eval file (prompts + the teacher's reference responses)."""
    data = cfg.data.model_copy(update={"max_response_length": MAX_TOKENS, "limit": None})
    examples, _ = load_examples(data, path=str(path), require_response=True)
    return tokenize_examples(examples, tokenizer, data)[0]


def multimodal(examples: list[TokenizedExample]) -> list[TokenizedExample]:
    return [e for e in examples if TASKS[e.meta["task"]].multimodal]


class Scorer:
    """One vLLM rollout group; :meth:`score` loads a trained student's weights into it through
    the weight sync (as training does) and scores both splits."""

    def __init__(self, cfg: Config, student: str, data: dict[str, Path], samples: int) -> None:
        self.cfg, self.student, self.k = cfg, student, samples
        self.tokenizer = load_tokenizer(student)
        self.sets = {s: load_split(cfg, self.tokenizer, data[s]) for s in SPLITS}
        self.group = RolloutGroup(cfg, student, cpus_per_actor(cfg, "rollout", [("rollout",)]))

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.group.shutdown()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def score(self, model_dir: Path | None) -> dict[str, dict[str, float]]:
        """Scores of the model in ``model_dir`` (None: the pre-trained student)."""
        path = model_dir or self.student
        weights = AutoModelForCausalLM.from_pretrained(path).state_dict()
        send_weights(weights.items(), self.group.workers, self.cfg.rollout.bucket_bytes)
        out = {}
        for split, examples in self.sets.items():
            ids = [e.prompt_ids for e in examples]
            greedy = self.group.generate(ids, SamplingParams.greedy(MAX_TOKENS), seed=self.cfg.seed)
            multi = multimodal(examples)
            sampled: dict[str, list[str]] = {}
            if multi:
                k = self.k
                params = SamplingParams(k, 1.0, 1.0, MAX_TOKENS)
                samples = self.group.generate(
                    [e.prompt_ids for e in multi], params, seed=self.cfg.seed
                )
                for i, e in enumerate(multi):
                    texts = [self.decode(s.token_ids) for s in samples[i * k : (i + 1) * k]]
                    sampled.setdefault(prompt_text(e.messages), []).extend(texts)
            texts = [self.decode(s.token_ids) for s in greedy]
            out[split] = score_texts(examples, texts, [s.length for s in greedy], sampled)
        return out


def score_teacher(
    sets: dict[str, list[TokenizedExample]], tokenizer: Any, seed: int, k: int, style: str
) -> dict[str, dict[str, float]]:
    """The reference row: fresh T=1 draws of the teacher (the server's own answer function)."""
    rng = random.Random(f"teacher-row-{seed}")
    out = {}
    for split, examples in sets.items():
        texts = [teacher_answer(prompt_text(e.messages), rng, style=style) for e in examples]
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
        sampled: dict[str, list[str]] = {}
        for e in multimodal(examples):
            prompt = prompt_text(e.messages)
            sampled.setdefault(prompt, []).extend(
                teacher_answer(prompt, rng, style=style) for _ in range(k)
            )
        out[split] = score_texts(examples, texts, lengths, sampled)
    return out
