"""Any training checkpoint to a standard Hugging Face folder, offline on CPU (``gad-export``).

A checkpoint is what the driver writes under ``<run_dir>/checkpoints/step_N/<role>/``
(:mod:`gad_ray.run_dir`): the role's fp32 masters, optimizer state and frozen models,
sharded by torch DCP (FSDP2, ``dcp/``) or DeepSpeed ZeRO-2/3 (``deepspeed/``), all weights or
only the LoRA adapters (plus ``lora_base.json``, the base they apply to). This module reads the
trained weights back whole without a process group (DCP's planner that rebuilds the state from
the checkpoint's metadata; DeepSpeed's ``zero_to_fp32`` reader of the fp32 partitions), puts
them in the module the learner exports from, and writes it with the learner's own export
(:func:`~gad_ray.learner.checkpoint.export_hf`, :func:`~gad_ray.learner.lora.export_lora`): a
converted checkpoint is the folder ``final/`` would have been at that step, in the compute
dtype of the run's config (``<run_dir>/config.yaml``), with the base model's generation config.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from gad_ray import run_dir as st
from gad_ray.config.schema import Config, InputError, LoraSpec, ModelSpec
from gad_ray.discriminator.model import (
    DiscriminatorModel,
    discriminator_config,
    discriminator_source,
)
from gad_ray.discriminator.shared import D_STATE
from gad_ray.learner.checkpoint import export_hf
from gad_ray.learner.deepspeed_engine import CHECKPOINT_TAG
from gad_ray.learner.engine import _DTYPES, MASTER_DTYPE, compute_dtype, to_masters
from gad_ray.learner.lora import (
    DISCRIMINATOR,
    GENERATOR,
    AdapterModel,
    adapter_config,
    add_adapters,
    export_lora,
    is_adapter_param,
    is_base_param,
)
from gad_ray.learner.proxy import proxy_view
from gad_ray.models.adapter_files import BASE_POINTER
from gad_ray.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
from gad_ray.validate import validate_config

ROLES = ("generator", "discriminator", "proxy")  # the learner roles a checkpoint may hold
SOURCE_FILE = "gad_export.json"  # in an export: the checkpoint it came from
DTYPES = tuple(_DTYPES)


class ExportError(InputError, ValueError):
    """A checkpoint that cannot be found, read or exported; the message names the path."""


@dataclass
class Checkpoint:
    """One role's state in a checkpoint, and the run it belongs to."""

    role: str
    role_dir: Path  # <step dir>/<role>
    state_dir: Path  # role_dir, or role_dir/discriminator for D on a shared LoRA base
    step: int | None
    run_dir: Path | None  # None when the checkpoint lies outside its run dir
    cfg: Config


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a run dir, a step checkpoint or a role's checkpoint directory."""
    p = Path(path).expanduser()
    return p.is_dir() and (
        (p / "checkpoints").is_dir() or (p / st.STATE_FILE).is_file() or _is_role_dir(p)
    )


def _is_role_dir(p: Path) -> bool:
    return (p / "dcp").is_dir() or (p / CHECKPOINT_TAG).is_dir()


def locate(path: str | Path, role: str | None = None, config: str | None = None) -> Checkpoint:
    """Find ``role``'s state (default: the role ``path`` names, else the generator) in ``path``:
    a run dir (its newest complete checkpoint), a step checkpoint or a role's directory; and
    the run's config (``config``, default the ``config.yaml`` of the run dir above it)."""
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise ExportError(f"checkpoint {str(path)!r}: no such directory")
    if (p / "checkpoints").is_dir() and not (p / st.STATE_FILE).is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # partial checkpoints are skipped
            done = st.complete_checkpoints(p)
        if not done:
            raise ExportError(f"run dir {str(p)!r} holds no complete checkpoint")
        p = done[-1]
    if _is_role_dir(p):
        role = role or (p.name if p.name in ROLES else "generator")
        shared_d = role == DISCRIMINATOR and _is_role_dir(p / D_STATE)
        if p.name in ROLES and p.name != role and not shared_d:
            raise ExportError(
                f"{str(p)!r} is the {p.name!r} role's checkpoint, not the {role!r} role's: "
                "pass the step directory above it"
            )
        role_dir = p
    else:
        problem = st.checkpoint_problem(p)
        if problem is not None:
            raise ExportError(f"{str(p)!r} is not a complete checkpoint ({problem})")
        present = [r for r in ROLES if _is_role_dir(p / r)]
        role = role or ("generator" if "generator" in present or not present else present[0])
        if role not in present:
            raise ExportError(
                f"checkpoint {str(p)!r} holds no {role!r} role (it holds {present}): pass "
                f"--role {present[0] if present else 'generator'}"
            )
        role_dir = p / role
    state_dir = role_dir
    if role == DISCRIMINATOR and _is_role_dir(role_dir / D_STATE):  # a shared LoRA base
        state_dir = role_dir / D_STATE
    step_dir = role_dir.parent
    run_dir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else None
    return Checkpoint(role, role_dir, state_dir, _step(step_dir), run_dir, _config(p, config))


def _step(step_dir: Path) -> int | None:
    state = step_dir / st.STATE_FILE
    if state.is_file():
        return int(st.read_trainer_state(step_dir)["step"])
    m = re.fullmatch(r"step_(\d+)", step_dir.name)
    return int(m.group(1)) if m else None


def _config(p: Path, config: str | None) -> Config:
    """The run's config: ``config``, or the ``config.yaml`` the driver wrote in the run dir."""
    if config is None:
        found = next(
            (d / "config.yaml" for d in [p, *p.parents][:4] if (d / "config.yaml").is_file()), None
        )
        if found is None:
            raise ExportError(
                f"no config.yaml of the run found above {str(p)!r} (the driver writes it in the "
                "run dir): pass the run's config with --config"
            )
        config = str(found)
    try:
        raw = yaml.safe_load(Path(config).read_text())
        return validate_config(raw, check_model_context=False)
    except (OSError, yaml.YAMLError, InputError) as err:
        raise ExportError(f"run config {config!r}: {err}") from None


def read_trained_state(state_dir: Path) -> dict[str, torch.Tensor]:
    """The trained model's full parameters saved in ``state_dir`` (fp32 masters, on CPU, named
    like the learner's module): a DCP checkpoint's ``model`` entry, or a DeepSpeed
    checkpoint's fp32 partitions merged."""
    if (state_dir / "dcp").is_dir():
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group: loading in a single process"
            state = _load_state_dict_from_keys({"model"}, checkpoint_id=str(state_dir / "dcp"))
        return state["model"]
    if (state_dir / CHECKPOINT_TAG).is_dir():
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as err:
            raise ExportError(
                f"{str(state_dir)!r} is a DeepSpeed checkpoint: reading it needs the deepspeed "
                f"package ({err}); pip install deepspeed"
            ) from None
        with redirect_stdout(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(str(state_dir), tag=CHECKPOINT_TAG)
    raise ExportError(f"{str(state_dir)!r} holds no learner checkpoint (no dcp/ nor deepspeed/)")


def role_model(cfg: Config, role: str) -> tuple[ModelSpec, str, str]:
    """The role's model spec, its initial weights (a model spec) and its tokenizer's spec, as
    the learner is built from them (:class:`~gad_ray.driver.roles.Roles`)."""
    student = cfg.model.student
    if role == "discriminator":
        return cfg.model.discriminator, discriminator_source(cfg), student.tokenizer or student.path
    spec = proxy_view(cfg).model.student if role == "proxy" else student
    return spec, spec.path, spec.tokenizer or spec.path


def run_dtype(cfg: Config, spec: ModelSpec) -> torch.dtype:
    """The compute dtype the run's learner held the model in (its HF export's dtype)."""
    device = torch.device("cuda" if cfg.cluster.gpus_per_node > 0 else "cpu")
    return compute_dtype(spec, device)


def default_out(ckpt: Checkpoint) -> Path:
    """``<run_dir>/exports/step_N`` (``step_N-<role>`` for another role than the generator),
    where ``trainer.export_every`` puts the generator's."""
    if ckpt.run_dir is None or ckpt.step is None:
        raise ExportError(
            f"{str(ckpt.role_dir)!r} lies outside a run dir's checkpoints/: name the output folder"
        )
    out = export_dir(ckpt.run_dir, ckpt.step)
    return out if ckpt.role == "generator" else out.with_name(f"{out.name}-{ckpt.role}")


def export_dir(run_dir: Path, step: int) -> Path:
    """``<run_dir>/exports/step_N``: the student's export at step N."""
    return run_dir / "exports" / f"step_{step:08d}"


def export_checkpoint(
    path: str | Path,
    out: str | Path | None = None,
    role: str | None = None,
    dtype: str | None = None,
    lora_export: str | None = None,
    config: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``role``'s model in checkpoint ``path`` (see :func:`locate`) as a Hugging Face
    folder ``out`` (default :func:`default_out`) in ``dtype`` (default: the run's compute
    dtype); LoRA merged or as a peft adapter per ``lora_export`` (default the role's
    ``lora.export``). The folder appears whole or not at all; an existing one is replaced
    only with ``overwrite``. Returns ``out``."""
    ckpt = locate(path, role, config)
    target = Path(out).expanduser().resolve() if out is not None else default_out(ckpt)
    spec, source, tokenizer = role_model(ckpt.cfg, ckpt.role)
    held = run_dtype(ckpt.cfg, spec)
    dtype_ = _DTYPES[dtype] if dtype is not None else held
    state = read_trained_state(ckpt.state_dir)
    tok = load_tokenizer(tokenizer)
    pointer = ckpt.role_dir / BASE_POINTER
    record = {"checkpoint": str(ckpt.role_dir), "role": ckpt.role, "step": ckpt.step}
    record["dtype"] = str(dtype_).removeprefix("torch.")
    with staged(target, overwrite) as tmp:
        if pointer.is_file():
            lora = json.loads(pointer.read_text())
            record["lora"] = _export_lora(tmp, ckpt, state, lora, held, dtype_, tok, lora_export)
        elif ckpt.role == "discriminator":
            config_ = discriminator_config(AutoConfig.from_pretrained(resolve_model_path(source)))
            export_hf(
                str(tmp), _cast(state, dtype_), config_, tok, AutoModelForSequenceClassification
            )
        else:
            config_ = AutoConfig.from_pretrained(resolve_model_path(source))
            export_hf(str(tmp), _cast(state, dtype_), config_, tok, base=source)
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2))
    return target


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in state.items()}


def _export_lora(
    out: Path,
    ckpt: Checkpoint,
    state: dict[str, torch.Tensor],
    pointer: dict[str, Any],
    held: torch.dtype,
    dtype: torch.dtype,
    tok: Any,
    lora_export: str | None,
) -> str:
    """The LoRA learner's module rebuilt over its base (in the compute dtype ``held``) with the
    saved adapter (and D's head) in it, exported as the learner does (``save_pretrained``);
    returns the export's kind (merged | adapter)."""
    base = pointer["base"]
    adapter = DISCRIMINATOR if ckpt.role == "discriminator" else GENERATOR
    spec = LoraSpec(**pointer["adapters"][adapter])
    if lora_export is not None:
        spec = spec.model_copy(update={"export": lora_export})
    if adapter == GENERATOR:
        module: nn.Module = AdapterModel(
            add_adapters(load_causal_lm(base, dtype=held), {adapter: spec}, 0)
        )
        keep = lambda n: is_adapter_param(n, adapter)  # noqa: E731
        _load_trained(to_masters(module), state, keep, ckpt.state_dir)
        full = _params(module, lambda n: keep(n) or is_base_param(n))
        export_lora(
            str(out), full, adapter, spec, adapter_config(module, adapter, base), dtype, tok
        )
        return spec.export
    d = DiscriminatorModel.from_pretrained(base, dtype=held, head_dtype=MASTER_DTYPE)
    d.model = add_adapters(d.model, {adapter: spec}, 0)
    # on a shared base D's adapter sits in the causal LM (lm.base_model.model.model.<layers>):
    # here in the backbone (model.base_model.model.<layers>), as in a learner of its own
    state = {
        re.sub(r"^lm\.base_model\.model\.model\.", "model.base_model.model.", k): v
        for k, v in state.items()
    }
    keep = lambda n: is_adapter_param(n, adapter) or n.startswith("score.")  # noqa: E731
    _load_trained(to_masters(d), state, keep, ckpt.state_dir)
    args = (
        adapter_config(d, adapter, base),
        dtype,
        tok,
        d.config,
        AutoModelForSequenceClassification,
    )
    export_lora(str(out), _params(d, lambda n: True), adapter, spec, *args, "model.")
    return spec.export


def _load_trained(
    module: nn.Module, state: dict[str, torch.Tensor], keep: Callable[[str], bool], where: Path
) -> None:
    """Copy the saved tensors ``keep`` picks into ``module``'s parameters of the same names;
    every such parameter must be saved, every saved tensor must have its parameter."""
    params = {n: p for n, p in module.named_parameters() if keep(n)}
    saved = {n: t for n, t in state.items() if keep(n)}
    missing, unexpected = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
    if missing or unexpected or not params:
        raise ExportError(
            f"{str(where)!r} does not match its LoRA config ({BASE_POINTER}): missing "
            f"{missing[:3]}, unexpected {unexpected[:3]} of {len(params)} trained tensors"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def _params(module: nn.Module, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in module.named_parameters() if keep(n)}


@contextmanager
def staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh directory beside ``out`` to write into, renamed to ``out`` when the body
    succeeds (removed when it fails): no half-written export is ever left at ``out``."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{str(out)!r} already exists: choose another folder or overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o755)  # mkdtemp makes it private
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
