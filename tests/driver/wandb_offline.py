"""Read what the real wandb package wrote in offline mode: each ``offline-run-*`` directory's
``run-<id>.wandb`` file (a LevelDB-style log of protobuf records, 32 KiB blocks)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7  # ":W&B" + magic + version; each record: crc32 (4), length (2), type (1)


@dataclass
class OfflineRun:
    run_id: str
    project: str
    tags: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per wandb.log
    tables: list[dict[str, Any]] = field(default_factory=list)  # media/table/*.table.json


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline run under ``wandb_dir`` (``<dir given to wandb.init>/wandb``), oldest first."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for d in sorted(wandb_dir.glob("offline-run-*")):
        (log,) = d.glob("run-*.wandb")
        run: OfflineRun | None = None
        history = []
        for raw in _records(log.read_bytes()):
            rec = pb.Record()
            rec.ParseFromString(raw)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run = OfflineRun(rec.run.run_id, rec.run.project, list(rec.run.tags))
            elif kind == "history":
                history.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in rec.history.item
                    }
                )
        assert run is not None, f"no run record in {log}"
        run.history = history
        run.tables = [json.loads(p.read_text()) for p in sorted(d.glob("files/media/table/*.json"))]
        runs.append(run)
    return runs


def _records(data: bytes) -> Iterator[bytes]:
    assert data[:4] == b":W&B", f"not a W&B log: {data[:7]!r}"
    pos, buf = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # a whole record
            yield chunk
        elif kind == 2:  # first, middle..., last fragment
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
