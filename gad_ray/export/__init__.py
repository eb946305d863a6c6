"""Checkpoints as standard Hugging Face folders (``gad-export``, :mod:`.convert`)."""

from gad_ray.export.convert import ExportError, export_checkpoint, is_checkpoint, locate

__all__ = ["ExportError", "export_checkpoint", "is_checkpoint", "locate"]
