"""RolloutWorker: one vLLM engine inside a Ray actor.

On CPU (the vllm-cpu build) the engine runs in-process (``VLLM_CPU_ENV``: no engine-core
subprocess, ``uni`` executor, bounded KV cache, no OMP pinning). On GPU it uses
``tensor_parallel_size`` GPUs of the actor (``uni`` executor for tp=1, ``mp`` above),
``gpu_memory_utilization`` and, with ``sleep_when_idle``, vLLM's sleep mode.

vLLM is imported inside the actor, after its environment is set.
"""

import os
import tempfile
import warnings

import numpy as np
import torch

from gad_ray.config.schema import RolloutConfig
from gad_ray.memory import memory_stats
from gad_ray.models.loading import VLLM_CPU_ENV, VLLM_CPU_LLM_KWARGS, model_max_context
from gad_ray.rollout.base import RolloutBackend
from gad_ray.rollout.types import (
    Sample,
    SamplingParams,
    check_request,
    sample_seed,
    stop_token_ids,
)
from gad_ray.rollout.weight_sync import IpcHandle, Meta, open_bucket, unpack_bucket

EXTENSION = "gad_ray.rollout.weight_sync.WeightSyncExtension"


def resolve_dtype(dtype: str, on_gpu: bool) -> str:
    """``auto`` -> bfloat16 on GPU, float32 on CPU."""
    if dtype == "auto":
        return "bfloat16" if on_gpu else "float32"
    return dtype


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's values of max_lora_rank


def engine_kwargs(
    model_path: str,
    cfg: RolloutConfig,
    dtype: str,
    max_model_len: int | None,
    seed: int,
    lora_rank: int = 0,
) -> dict:
    """``vllm.LLM`` keyword arguments for this machine (CPU or GPU) and config; ``lora_rank``
    > 0 serves one LoRA adapter of that rank (vLLM's LoRA support, on CPU too)."""
    on_gpu = torch.cuda.is_available()
    kw = {
        "model": model_path,
        "seed": seed,
        "max_model_len": max_model_len,
        "max_num_seqs": cfg.max_num_seqs,
        "worker_extension_cls": EXTENSION,
        # log-probs of the distribution sampled from (logits / T), like the learner's
        "logprobs_mode": "processed_logprobs",
        # no sampling defaults from the model's generation_config.json (its EOS ids still
        # apply); requests carry every setting anyway (docs/placement.md "Sampling")
        "generation_config": "vllm",
    }
    if on_gpu:
        tp = cfg.tensor_parallel_size
        kw |= {
            "tensor_parallel_size": tp,
            "distributed_executor_backend": "uni" if tp == 1 else "mp",
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "enforce_eager": cfg.enforce_eager,
            "enable_sleep_mode": cfg.sleep_when_idle,
        }
    else:
        if cfg.tensor_parallel_size != 1:
            raise ValueError(
                f"rollout.tensor_parallel_size={cfg.tensor_parallel_size}: the CPU build runs "
                "one in-process engine per worker; use rollout.num_workers to scale on CPU"
            )
        kw |= VLLM_CPU_LLM_KWARGS
        # vllm-cpu 0.32 crashes on seeded requests whose prefill is chunked ("CPU Generator
        # does not use offset"): schedule whole prompts only.
        context = max_model_len or model_max_context(model_path) or 0
        kw |= {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, context)}
    if cfg.kv_cache_memory_bytes is not None:
        kw["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
    if lora_rank:
        rank = next((r for r in LORA_RANKS if r >= lora_rank), None)
        if rank is None:
            raise ValueError(f"LoRA rank {lora_rank} is above vLLM's largest ({LORA_RANKS[-1]})")
        kw |= {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
    kw["dtype"] = resolve_dtype(dtype, on_gpu)
    return kw


class RolloutWorker(RolloutBackend):
    """A vLLM engine serving ``generate`` and receiving weight updates (wrap with ``ray.remote``).

    Bad requests raise ValueError naming the prompt and the limit; the actor keeps serving.
    """

    def __init__(
        self,
        model_path: str,
        cfg: RolloutConfig,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        lora_rank: int = 0,
    ):
        """``lora_rank`` > 0: the engine serves the student's LoRA adapter over the base at
        ``model_path``; weight updates are then adapters (``begin_weight_update(config)``)."""
        self.on_gpu = torch.cuda.is_available()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not self.on_gpu:
            os.environ.update(VLLM_CPU_ENV)
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override kv_cache_memory_bytes
        from vllm import LLM
        from vllm.platforms import current_platform

        self.model_path = model_path
        self.cfg = cfg
        self.llm = LLM(**engine_kwargs(model_path, cfg, dtype, max_model_len, seed, lora_rank))
        self.stop_ids = stop_token_ids(model_path)
        self.lora_rank = lora_rank
        self.lora_request = None  # the adapter version served (None: the base alone)
        self.incoming: tuple[dict, dict[str, torch.Tensor]] | None = None  # an adapter update
        model_config = self.llm.llm_engine.model_config
        self.max_model_len = model_config.max_model_len
        self.vocab_size = model_config.get_vocab_size()
        self.tp_size = cfg.tensor_parallel_size if self.on_gpu else 1
        if not self.on_gpu or not current_platform.is_sleep_mode_available():
            self.sleep_unsupported = (
                f"vLLM sleep mode is not available on {current_platform.device_type}"
            )
        elif not cfg.sleep_when_idle:
            self.sleep_unsupported = (
                "rollout.sleep_when_idle=false (engine built without sleep mode)"
            )
        else:
            self.sleep_unsupported = ""
        self.sleeping: list[str] = []  # what is asleep: "weights", "kv_cache"

    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        seed: int | None = None,
        prompt_indices: list[int] | None = None,
    ) -> list[Sample]:
        """``params.n`` samples per prompt, prompt-major. Sample j of prompt ``i`` is one request
        seeded ``sample_seed(seed, prompt_indices[i], j)``, so results do not depend on how a
        batch is split and no two samples share an RNG stream. ``temperature=0`` is greedy (its
        one result repeated ``n`` times). Log-probs are vLLM's processed ones (after
        temperature, and top-p when ``top_p < 1``). Nothing else shapes the distribution (no
        penalty, no top-k); a response ends at :func:`stop_token_ids`."""
        import vllm
        from vllm.inputs import TokensPrompt

        check_request(prompt_ids, self.max_model_len, self.vocab_size, prompt_indices)
        if self.sleeping:
            raise RuntimeError(f"rollout worker is asleep ({self.sleeping}); call wake_up first")
        indices = list(range(len(prompt_ids))) if prompt_indices is None else prompt_indices
        n = params.n
        requests = n if params.temperature > 0 else 1  # a request per sample; greedy: 1, copied
        prompts, requested = [], []
        for i, ids in zip(indices, prompt_ids, strict=True):
            for j in range(requests):
                prompts.append(TokensPrompt(prompt_token_ids=list(ids)))
                requested.append(
                    vllm.SamplingParams(
                        n=1,
                        temperature=params.temperature,
                        top_p=params.top_p,
                        max_tokens=params.max_tokens,
                        stop_token_ids=self.stop_ids,
                        seed=None if seed is None else sample_seed(seed, i, j),
                        logprobs=0,
                    )
                )
        outputs = self.llm.generate(
            prompts, requested, use_tqdm=False, lora_request=self.lora_request
        )
        samples = []
        for k, out in enumerate(outputs):
            i = indices[k // requests]
            (c,) = out.outputs
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"prompt {i}: vLLM finished with {c.finish_reason!r}")
            ids = list(c.token_ids)
            lps = [step[t].logprob for step, t in zip(c.logprobs, ids, strict=True)]
            samples += [Sample(i, ids, lps, c.finish_reason) for _ in range(n // requests)]
        return samples

    # -- weight sync (see gad_ray.rollout.weight_sync) -----------------------------------------

    def weight_group_size(self) -> int:
        """Ranks this worker adds to a broadcast group (its tensor-parallel processes)."""
        return self.tp_size

    def init_weight_group(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str
    ) -> None:
        self.llm.collective_rpc(
            "gad_join_group", args=(host, port, rank_offset, world_size, backend)
        )

    def begin_weight_update(self, adapter: dict | None = None) -> None:
        """Start an update: the full weights, or with ``adapter`` (its ``adapter_config.json``)
        a new version of the LoRA adapter."""
        if adapter is None:
            self.llm.collective_rpc("gad_begin_update")
            return
        if not self.lora_rank:
            raise ValueError(
                "a LoRA adapter was sent to a rollout worker built without LoRA (lora_rank=0)"
            )
        self.incoming = (adapter, {})

    def _collect(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self.incoming[1].update((n, t.to("cpu", copy=True)) for n, t in named)

    def receive_bucket(self, metas: list[Meta], flat: np.ndarray) -> None:
        """Load one bucket (a read-only array straight from the object store)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(flat)
        if self.incoming is not None:
            self._collect(unpack_bucket(metas, tensor))
            return
        self.llm.collective_rpc("gad_load_bucket", args=(metas, tensor))

    def receive_broadcast(self, metas: list[Meta]) -> None:
        if self.incoming is not None:  # every tp rank receives; rank 0's copy is kept
            self._collect(self.llm.collective_rpc("gad_recv_adapter", args=(metas,))[0])
            return
        self.llm.collective_rpc("gad_recv_broadcast", args=(metas,))

    def receive_ipc(self, metas: list[Meta], handle: IpcHandle) -> None:
        """Load a bucket the sender shares (``ipc``), opened inside the vLLM worker process,
        which owns the weights' device; one process only (tensor_parallel_size=1)."""
        if self.tp_size != 1:
            raise ValueError(
                f"ipc weight sync needs tensor_parallel_size=1 (colocated), got {self.tp_size}"
            )
        if self.incoming is not None:
            device = "cuda" if self.on_gpu else "cpu"
            self._collect(unpack_bucket(metas, open_bucket(handle, device)))
            return
        self.llm.collective_rpc("gad_load_ipc", args=(metas, handle))

    def finish_weight_update(self) -> None:
        """Process the loaded weights (or serve the received adapter as a new version) and
        drop every cached prefix of the old model."""
        if self.incoming is not None:
            config, tensors = self.incoming
            self.incoming = None
            self._serve_adapter(config, tensors)
        else:
            self.llm.collective_rpc("gad_finish_update")
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")

    def _serve_adapter(self, config: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Register the adapter as version v + 1 (vLLM reads it from a temporary directory),
        drop version v; later requests use it."""
        from vllm.lora.request import LoRARequest

        from gad_ray.models.adapter_files import save_adapter

        version = 1 if self.lora_request is None else self.lora_request.lora_int_id + 1
        with tempfile.TemporaryDirectory(prefix="gad-lora-") as path:
            save_adapter(path, tensors, config)
            request = LoRARequest(f"student-v{version}", version, path)
            if self.lora_request is not None:
                self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
            if not self.llm.llm_engine.add_lora(request):
                raise RuntimeError(f"vLLM did not load LoRA adapter version {version}")
        self.lora_request = request

    # -- sleep / wake (colocated placement) -----------------------------------------------------

    def sleep(self, level: int = 1) -> dict:
        """Free GPU memory (level 1: weights to CPU, KV cache dropped; level 2: both dropped).
        A no-op where sleep mode is unavailable; the reply says which."""
        if self.sleep_unsupported:
            return {"supported": False, "reason": self.sleep_unsupported}
        self.llm.sleep(level=level)
        self.sleeping = ["weights", "kv_cache"]
        return {"supported": True, "level": level}

    def wake_up(self, tags: list[str] | None = None) -> dict:
        """Wake ``tags`` (``["weights"]`` before a weight sync, then ``["kv_cache"]``; all when
        None)."""
        if self.sleep_unsupported:
            return {"supported": False, "reason": self.sleep_unsupported}
        tags = tags or ["weights", "kv_cache"]
        self.llm.wake_up(tags=tags)
        self.sleeping = [t for t in self.sleeping if t not in tags]
        return {"supported": True, "awake": tags}

    def memory_stats(self, reset: bool = False) -> dict[str, float]:
        """This worker's memory (:func:`gad_ray.memory.memory_stats`), peak since the last reset."""
        return memory_stats(torch.device("cuda" if self.on_gpu else "cpu"), reset)

    def health(self) -> dict:
        return {
            "backend": "vllm",
            "device": "cuda" if self.on_gpu else "cpu",
            "model": self.model_path,
            "max_model_len": self.max_model_len,
            "torch_threads": torch.get_num_threads(),
            "tensor_parallel_size": self.tp_size,
            "sleeping": self.sleeping,
            "sleep_supported": not self.sleep_unsupported,
            "lora_version": self.lora_request.lora_int_id if self.lora_request else 0,
        }
