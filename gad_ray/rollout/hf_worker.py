"""HFRolloutWorker: the RolloutWorker interface on transformers ``generate`` (``rollout=hf``),
for machines without vLLM. Slower (one prompt at a time, n samples batched), same results
contract: per-token log-probs of the sampled tokens under ``softmax(logits / temperature)``,
(after top-p when ``top_p < 1``), ``stop`` / ``length``, seeds of their own per prompt (its n
samples are one batched draw).

The model's generation config is replaced by one holding only its special token ids: its
sampling settings (Qwen2.5-Instruct's repetition penalty, top-k, top-p, ...) would make
``generate`` sample from a distribution the learner does not compute (docs/placement.md
"Sampling").
"""

import warnings

import numpy as np
import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from transformers import GenerationConfig

from gad_ray.config.schema import RolloutConfig
from gad_ray.memory import memory_stats
from gad_ray.models.loading import load_causal_lm
from gad_ray.rollout.base import RolloutBackend
from gad_ray.rollout.types import (
    Sample,
    SamplingParams,
    check_request,
    sample_seed,
    stop_token_ids,
)
from gad_ray.rollout.vllm_worker import resolve_dtype
from gad_ray.rollout.weight_sync import (
    IpcHandle,
    Meta,
    broadcast,
    bucket_nbytes,
    join_weight_group,
    open_bucket,
    unpack_bucket,
)


class HFRolloutWorker(RolloutBackend):
    """A transformers causal LM serving ``generate`` and receiving weight updates."""

    def __init__(
        self,
        model_path: str,
        cfg: RolloutConfig,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        lora_rank: int = 0,
    ):
        """``lora_rank`` > 0: weight updates may be LoRA adapters, served with peft over the
        base (the rank itself comes with each adapter's config)."""
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dt = getattr(torch, resolve_dtype(dtype, self.device.type == "cuda"))
        self.model_path = model_path
        self.model = load_causal_lm(model_path, dtype=dt).to(self.device).eval()
        config = self.model.config
        self.max_model_len = max_model_len or config.max_position_embeddings
        self.vocab_size = config.vocab_size
        self.eos_ids = set(stop_token_ids(model_path))
        pad = self.model.generation_config.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self.model.generation_config = GenerationConfig(
            eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id
        )
        self.params = dict(self.model.state_dict(keep_vars=True))
        self.group: dist.ProcessGroup | None = None
        self.seed = seed
        self.lora_rank = lora_rank
        self.incoming: dict[str, torch.Tensor] | None = None  # an adapter update's tensors

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        seed: int | None = None,
        prompt_indices: list[int] | None = None,
    ) -> list[Sample]:
        """``params.n`` samples per prompt, prompt-major; prompt ``i``'s batch of n is drawn
        from seed ``sample_seed(seed, index)``; log-probs at the temperature (raw when greedy)."""
        check_request(prompt_ids, self.max_model_len, self.vocab_size, prompt_indices)
        n, temperature, top_p = params.n, params.temperature, params.top_p
        indices = list(range(len(prompt_ids))) if prompt_indices is None else prompt_indices
        samples = []
        for i, ids in zip(indices, prompt_ids, strict=True):
            torch.manual_seed(self.seed if seed is None else sample_seed(seed, i))
            budget = min(params.max_tokens, self.max_model_len - len(ids))
            # top_k=0: off (transformers' default is 50); nothing else is set
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            out = self.model.generate(
                torch.tensor([ids] * n, device=self.device),
                attention_mask=torch.ones(n, len(ids), dtype=torch.long, device=self.device),
                max_new_tokens=budget,
                min_new_tokens=0,
                eos_token_id=sorted(self.eos_ids),
                pad_token_id=self.pad_id,
                return_dict_in_generate=True,
                output_scores=True,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )
            new = out.sequences[:, len(ids) :]
            # the processed scores (after temperature and top-p), like vLLM's processed logprobs
            logps = torch.stack(out.scores, 1).float().log_softmax(-1)
            logps = logps.gather(-1, new[:, : logps.shape[1], None]).squeeze(-1)
            for row, lp in zip(new.tolist(), logps.tolist(), strict=True):
                end = next((k + 1 for k, t in enumerate(row) if t in self.eos_ids), None)
                reason = "length" if end is None else "stop"
                end = end or len(row)
                samples.append(Sample(i, row[:end], lp[:end], reason))
        return samples

    # -- weight sync ------------------------------------------------------------------------------

    def weight_group_size(self) -> int:
        return 1

    def init_weight_group(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str
    ) -> None:
        self.group = join_weight_group(host, port, rank_offset, world_size, backend)

    def begin_weight_update(self, adapter: dict | None = None) -> None:
        """Full weights are overwritten in place, bucket by bucket; a LoRA adapter (``adapter``:
        its config) is collected and set at the end (the model wrapped by peft on the first)."""
        if adapter is None:
            return
        if not self.lora_rank:
            raise ValueError(
                "a LoRA adapter was sent to a rollout worker built without LoRA (lora_rank=0)"
            )
        if not isinstance(self.model, PeftModel):
            self.model = get_peft_model(self.model, LoraConfig.from_peft_type(**adapter)).eval()
        self.incoming = {}

    @torch.no_grad()
    def _load(self, metas: list[Meta], flat: torch.Tensor) -> None:
        if self.incoming is not None:
            self.incoming.update((n, t.clone()) for n, t in unpack_bucket(metas, flat))
            return
        for name, t in unpack_bucket(metas, flat):
            if name not in self.params:
                raise KeyError(f"weight {name!r} is not a parameter of the rollout model")
            self.params[name].copy_(t)

    def receive_bucket(self, metas: list[Meta], flat: np.ndarray) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self._load(metas, torch.from_numpy(flat))

    def receive_broadcast(self, metas: list[Meta]) -> None:
        flat = torch.empty(bucket_nbytes(metas), dtype=torch.uint8, device=self.device)
        broadcast(self.group, flat)
        self._load(metas, flat)

    def receive_ipc(self, metas: list[Meta], handle: IpcHandle) -> None:
        self._load(metas, open_bucket(handle, self.device))

    def finish_weight_update(self) -> None:
        """Set a received adapter (no cache survives between generate calls)."""
        if self.incoming is not None:
            result = set_peft_model_state_dict(self.model, self.incoming)
            self.incoming = None
            if result.unexpected_keys:
                raise KeyError(f"adapter weights the model lacks: {result.unexpected_keys[:5]}")

    def sleep(self, level: int = 1) -> dict:
        return {"supported": False, "reason": "the HF rollout backend has no sleep mode"}

    def wake_up(self, tags: list[str] | None = None) -> dict:
        return {"supported": False, "reason": "the HF rollout backend has no sleep mode"}

    def memory_stats(self, reset: bool = False) -> dict[str, float]:
        """This worker's memory (:func:`gad_ray.memory.memory_stats`), peak since the last reset."""
        return memory_stats(self.device, reset)

    def health(self) -> dict:
        return {
            "backend": "hf",
            "device": self.device.type,
            "model": self.model_path,
            "max_model_len": self.max_model_len,
            "torch_threads": torch.get_num_threads(),
            "tensor_parallel_size": 1,
            "sleeping": [],
            "sleep_supported": False,
        }
