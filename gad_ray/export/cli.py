"""``gad-export CHECKPOINT [OUT]``: a training checkpoint as a standard Hugging Face folder."""

from __future__ import annotations

import argparse
import sys

from gad_ray.config.schema import InputError
from gad_ray.export.convert import DTYPES, ROLES, export_checkpoint

DESCRIPTION = """\
Write a standard Hugging Face model folder (weights, config.json, the tokenizer and the base
model's generation_config.json) from any gad-ray checkpoint: a run dir (its newest complete
checkpoint), a step checkpoint (<run_dir>/checkpoints/step_N) or one role's directory in it;
written by FSDP2 or DeepSpeed ZeRO-2/3, full fine-tuning or LoRA. Runs offline on CPU: no Ray,
no GPU. The weights are in the compute dtype of the run's config (<run_dir>/config.yaml)."""

EPILOG = """\
examples:
  gad-export outputs/gad                        # newest checkpoint -> outputs/gad/exports/step_N
  gad-export outputs/gad/checkpoints/step_00000200 student-200
  gad-export outputs/gad --role discriminator --dtype float32
  gad-export outputs/lora --lora-export adapter   # peft adapter dir instead of a merged model

The folder loads with transformers (AutoModelForCausalLM.from_pretrained), serves with vLLM,
and gad-eval scores it (gad-eval also takes the checkpoint or run dir itself)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gad-export",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="run dir, step checkpoint dir, or a role's dir in one")
    p.add_argument(
        "out",
        nargs="?",
        help="output folder (default: <run_dir>/exports/step_N, step_N-<role> for D or the "
        "proxy, where trainer.export_every writes)",
    )
    p.add_argument(
        "--role",
        choices=ROLES,
        help="which model of the checkpoint (default: the role dir given, else generator)",
    )
    p.add_argument(
        "--dtype", choices=DTYPES, help="weights dtype (default: the run's compute dtype)"
    )
    p.add_argument(
        "--lora-export",
        choices=("merged", "adapter"),
        help="LoRA: a plain model with the adapter merged in, or peft's adapter directory "
        "(default: model.<role>.lora.export of the run's config)",
    )
    p.add_argument("--config", help="the run's config.yaml (default: the one in the run dir above)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        out = export_checkpoint(
            args.checkpoint,
            args.out,
            role=args.role,
            dtype=args.dtype,
            lora_export=args.lora_export,
            config=args.config,
            overwrite=args.overwrite,
        )
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"exported to {out}")


if __name__ == "__main__":
    main()
