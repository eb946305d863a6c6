"""``gad-export``'s help and its errors on what is not an exportable checkpoint (no Ray, no
training: each names the path and what is wrong, exit 2); an export appears whole or not at
all."""

import pytest

from gad_ray.export.cli import main as gad_export
from gad_ray.export.convert import ExportError, staged


def fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        gad_export(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_help_says_what_it_does_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        gad_export(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for words in ("Hugging Face model folder", "generation_config.json", "--role", "--dtype"):
        assert words in text
    assert "--lora-export" in text and "examples:" in text and "gad-eval" in text


def test_what_is_not_a_complete_checkpoint_is_named(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert f"checkpoint '{missing}': no such directory" in fails([str(missing)], capsys)
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000002"
    (step / "generator" / "dcp").mkdir(parents=True)  # a checkpoint cut short: no state file
    assert f"run dir '{run}' holds no complete checkpoint" in fails([str(run)], capsys)
    err = fails([str(step)], capsys)
    assert f"'{step}' is not a complete checkpoint (trainer_state.json is missing" in err
    err = fails([str(step / "generator")], capsys)
    assert f"no config.yaml of the run found above '{step / 'generator'}'" in err
    err = fails([str(step / "generator"), "--role", "discriminator"], capsys)
    assert "is the 'generator' role's checkpoint, not the 'discriminator' role's" in err
    (run / "config.yaml").write_text("model: {student: {path: 1}}\n")
    assert f"run config '{run / 'config.yaml'}'" in fails([str(step / "generator")], capsys)


def test_staged_export_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged(out, overwrite=False) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []  # neither out nor the temporary folder
    with staged(out, overwrite=False) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["config.json"]
    with pytest.raises(ExportError, match="already exists"), staged(out, overwrite=False):
        pass
    with staged(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_text("")
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
