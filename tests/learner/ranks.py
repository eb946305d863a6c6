"""Run a function on N fresh processes, one per rank, without Ray: for tests that must watch a
rank from its very start (which weight files it opens, what it moves to its device).

``run_ranks("tests.learner.test_x:fn", world=2, **kwargs)`` starts ``world`` spawned processes;
rank r calls ``fn(rank=r, world=world, port=port, **kwargs)`` (``port``: a free TCP port on
127.0.0.1 for the gloo rendezvous, ``tcp://127.0.0.1:{port}``) and the call returns the
ranks' results in rank order (picklable: CPU tensors, dicts...). A rank that raises fails the
call with its traceback.

Each rank records the weight files it opens (:func:`weight_files_opened`): safetensors files
through ``safetensors.safe_open`` (which transformers' loader calls; wrapped before anything
imports transformers) and any Python-level ``open`` of a ``.safetensors``/``.bin``/``.pt`` file
(an audit hook).

This module imports nothing heavy at the top: the spawned ranks import it first.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import traceback
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_OPENED: list[str] = []


def weight_files_opened() -> list[str]:
    """The weight files this rank opened so far (paths, in order)."""
    return list(_OPENED)


def _record_weight_reads() -> None:
    import safetensors

    def audit(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str) and args[0].endswith(WEIGHT_SUFFIXES):
            _OPENED.append(args[0])

    sys.addaudithook(audit)
    opener = safetensors.safe_open

    def safe_open(filename, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        _OPENED.append(str(filename))
        return opener(filename, *args, **kwargs)

    safetensors.safe_open = safe_open  # before transformers imports the name


def _rank_main(target: str, rank: int, world: int, port: int, kwargs: dict, out: Any) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    _record_weight_reads()
    try:
        module, name = target.split(":")
        fn = getattr(importlib.import_module(module), name)
        result = fn(rank=rank, world=world, port=port, **kwargs)
        out.put((rank, True, pickle.dumps(result)))  # by value: this process may be gone
    except BaseException:  # noqa: BLE001 - the parent reports it
        out.put((rank, False, traceback.format_exc()))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target: str, world: int = 2, timeout: float = 900, **kwargs: Any) -> list[Any]:
    """``target``'s results on ranks 0..world-1 (see the module docstring)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(target, r, world, port, kwargs, out), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        while len(results) < world:
            try:
                rank, ok, value = out.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(
                    f"{target}: ranks {sorted(set(range(world)) - set(results))} "
                    f"gave no result within {timeout} s"
                ) from None
            if not ok:
                raise AssertionError(f"{target} failed on rank {rank}:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
