"""Fixtures of the export tests: a base model whose generation config is not the one
transformers derives from its model config, greedy generation."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from gad_ray.data.tokenize import encode_prompt
from gad_ray.models.loading import load_tokenizer
from gad_ray.synthetic.tasks import make_dataset

# sampling defaults and a second EOS id: everything a regenerated generation config loses
GENERATION = {
    "bos_token_id": 0,
    "eos_token_id": [2, 3],
    "pad_token_id": 0,
    "do_sample": True,
    "temperature": 0.7,
    "top_k": 20,
    "top_p": 0.8,
    "repetition_penalty": 1.05,
}


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny student with :data:`GENERATION` as its generation config."""
    out = tmp_path_factory.mktemp("base") / "student"
    shutil.copytree(tiny_model_dir, out)
    (out / "generation_config.json").write_text(json.dumps(GENERATION, indent=2))
    return out


def greedy(model: torch.nn.Module | Path, tokenizer_dir: Path, n: int = 4) -> list[list[int]]:
    """Greedy continuations (8 tokens at most) of ``n`` chat prompts; ``model`` is a module or
    a directory transformers loads."""
    if isinstance(model, Path):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    tok = load_tokenizer(str(tokenizer_dir))
    config = GenerationConfig(do_sample=False, max_new_tokens=8, eos_token_id=2, pad_token_id=0)
    out = []
    for row in make_dataset(n, seed=3):
        ids = torch.tensor([encode_prompt(tok, row["content"])])
        with torch.no_grad():
            out.append(model.generate(ids, generation_config=config)[0, ids.shape[1] :].tolist())
    return out
