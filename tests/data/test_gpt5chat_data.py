"""The recipe presets read the authors' released training set by its hub name
(ytz20/LMSYS-Chat-GPT-5-Chat-Response); its columns go through the presets' mapping. No hub here:
a local copy with the same layout (data/<split>-00000-of-00001.parquet) and schema stands in."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gad_ray.data.dataset import load_examples
from gad_ray.hydra_app import compose

HUB_NAME = "ytz20/LMSYS-Chat-GPT-5-Chat-Response"
RECIPES = ["qwen2.5-7b_gpt5chat", "qwen2.5-14b_gpt5chat", "qwen2.5-1.5b_gpt5chat"]
# the dataset card's features: id (string), content (list of {content, role}), teacher_response
MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
SCHEMA = pa.schema([("id", pa.string()), ("content", MESSAGES), ("teacher_response", pa.string())])
TRAIN = [
    {
        "id": "c1",
        "content": [{"content": "What is the capital of France?", "role": "user"}],
        "teacher_response": "The capital of France is **Paris**.",
    },
    {
        "id": "c2",
        "content": [
            {"content": "Answer briefly.", "role": "system"},
            {"content": "Name a prime number.", "role": "user"},
        ],
        "teacher_response": "7",
    },
]
TEST = [{"id": "t1", "content": [{"content": "Hi", "role": "user"}], "teacher_response": "Hello!"}]


def _hub_layout(root):
    (root / "data").mkdir(parents=True)
    for split, rows in (("train", TRAIN), ("test", TEST)):
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_point_at_the_released_set_by_hub_name(name):
    data = compose([f"experiment={name}"]).data
    assert (data.train_path, data.split, data.format) == (HUB_NAME, "train", "auto")
    assert (data.prompt_key, data.response_key) == ("content", "teacher_response")


def _expect(examples):
    assert [e.id for e in examples] == ["c1", "c2"]
    assert examples[0].messages == [{"role": "user", "content": "What is the capital of France?"}]
    assert examples[1].messages[0] == {"role": "system", "content": "Answer briefly."}
    assert [e.response for e in examples] == ["The capital of France is **Paris**.", "7"]


def test_a_local_copy_loads_through_the_hub_path_and_the_preset_mapping(tmp_path):
    """``datasets.load_dataset`` on a directory with the hub repo's layout, offline: the same
    code path (data.format=hub, data.split=train) as the hub name."""
    root = _hub_layout(tmp_path / "LMSYS-Chat-GPT-5-Chat-Response")
    data = compose(["experiment=qwen2.5-7b_gpt5chat"]).data
    data = data.model_copy(update={"train_path": str(root), "format": "hub"})
    code = (
        "import json, sys\nfrom gad_ray.config.schema import DataConfig\n"
        "from gad_ray.data.dataset import load_examples\n"
        "examples, _ = load_examples(DataConfig.model_validate_json(sys.argv[1]))\n"
        "print(json.dumps([[e.id, e.messages, e.response] for e in examples]))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["HF_DATASETS_CACHE"] = str(tmp_path / "cache")
    out = subprocess.run(
        [sys.executable, "-c", code, data.model_dump_json()],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r[0] for r in rows] == ["c1", "c2"]  # the train split only
    assert rows[0][1] == [{"role": "user", "content": "What is the capital of France?"}]
    assert [r[2] for r in rows] == ["The capital of France is **Paris**.", "7"]


def test_a_downloaded_parquet_file_loads_with_the_preset_mapping(tmp_path):
    """What a user gets from `hf download` (the train split's Parquet file), data.format=auto."""
    root = _hub_layout(tmp_path / "hf_dl")
    data = compose(["experiment=qwen2.5-7b_gpt5chat"]).data
    path = root / "data" / "train-00000-of-00001.parquet"
    examples, stats = load_examples(data.model_copy(update={"train_path": str(path)}))
    _expect(examples)
    assert stats["examples"] == 2 and stats["skipped_bad_rows"] == 0
