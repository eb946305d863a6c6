"""Tiny random models and a locally trained tokenizer (no model hub needed).

All sizes and architectures share ONE byte-level BPE tokenizer with Qwen2.5-Instruct's
special tokens and a ChatML chat template, so a proxy, a student and a discriminator
built here are always compatible. Models are saved with `save_pretrained` and loaded
back through the same `from_pretrained` path real checkpoints use.
"""

import argparse
import functools
import json
import random
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen2Tokenizer,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]
VOCAB_SIZE = 2048

# ChatML as in Qwen2.5-Instruct (without Qwen's tool-calling branches or default system prompt).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unsupported chat role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# name -> (hidden, layers, heads, kv_heads, intermediate, init std); head_dim = hidden // heads.
# tiny uses a large init std: with tied embeddings and std 0.02 its greedy output just repeats
# the last prompt token, which makes greedy-equivalence checks (HF vs vLLM) vacuous.
SIZES: dict[str, tuple[int, int, int, int, int, float]] = {
    "tiny": (64, 2, 2, 1, 256, 0.2),  # ~0.25M params, tied embeddings
    "small": (384, 6, 6, 2, 1536, 0.02),  # ~15M params
    "base": (512, 8, 8, 2, 2048, 0.02),  # ~32M params (~2.2x small), a "proxy"
}
ARCHS = ("qwen2", "llama")

_WORDS = """the be to of and a in that have i it for not on with he as you do at this but his by
from they we say her she or an will my one all would there their what so up out if about who get
which go me when make can like time no just him know take people into year your good some could
them see other than then now look only come its over think also back after use two how our work
first well way even new want because any these give day most us is are was were been has had did
said went made found water long little very words called where number sound
world hello model teacher student answer question please thank yes help write explain reason
however therefore example code python list value data train learn text token step result
true false none error file line name test small large big fast slow high low left right down
""".split()


def _corpus(seed: int = 0, n_lines: int = 6000) -> list[str]:
    """Deterministic training text: English words, numbers, punctuation, ASCII symbols."""
    rng = random.Random(seed)
    punct = list(".,;:!?") + ["...", " -", " (", ")", '"', "'"]
    lines = []
    for i in range(n_lines):
        parts = []
        for _ in range(rng.randint(4, 16)):
            r = rng.random()
            if r < 0.75:
                w = rng.choice(_WORDS)
                parts.append(w.capitalize() if rng.random() < 0.15 else w)
            elif r < 0.85:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
            elif r < 0.95:
                parts.append(rng.choice(punct))
            else:
                k = rng.randint(1, 6)
                parts.append(
                    "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(k))
                )
        lines.append(" ".join(parts) + ["", "\n", "\n\n"][i % 3])
    lines.append(string.printable)
    return lines


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Train the byte-level BPE once per process; return (vocab, merges)."""
    tok = Tokenizer(models.BPE())
    # Qwen2's pipeline, which Qwen2Tokenizer rebuilds on load (NFC, Qwen's split regex).
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], tuple((a, b) for a, b in model["merges"])


def build_tokenizer() -> Qwen2Tokenizer:
    """The shared tokenizer: byte-level BPE (2048 tokens), Qwen2.5-Instruct specials, ChatML.

    It is a `Qwen2Tokenizer` (saved as such), so `AutoTokenizer` reloads the very same pipeline
    for every architecture built here.
    """
    vocab, merges = _trained_bpe()
    return Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )


def model_config(size: str, arch: str, tokenizer: Qwen2Tokenizer | None = None) -> PretrainedConfig:
    """Config of a tiny model of `size` in SIZES and `arch` in ARCHS (fp32, 2048 positions)."""
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; expected one of {sorted(SIZES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny model arch {arch!r}; expected one of {list(ARCHS)}")
    tok = tokenizer or build_tokenizer()
    hidden, layers, heads, kv_heads, inter, init_std = SIZES[size]
    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    return cls(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        intermediate_size=inter,
        max_position_embeddings=2048,
        tie_word_embeddings=size == "tiny",
        initializer_range=init_std,
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )


def count_params(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def build_tiny_model(
    out_dir: str | Path, size: str = "tiny", arch: str = "qwen2", seed: int = 0
) -> Path:
    """Randomly initialise a model and save it with its tokenizer and generation config."""
    tok = build_tokenizer()
    config = model_config(size, arch, tok)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """Console script `gad-tiny`: build a tiny random model into a directory."""
    p = argparse.ArgumentParser(description="Build a tiny random causal LM + tokenizer locally.")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--arch", choices=ARCHS, default="qwen2")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = build_tiny_model(args.out, args.size, args.arch, args.seed)
    with torch.device("meta"):
        n = count_params(AutoModelForCausalLM.from_config(model_config(args.size, args.arch)))
    print(f"{out}  ({args.size} {args.arch}, {n:,} parameters)")


if __name__ == "__main__":
    main()
