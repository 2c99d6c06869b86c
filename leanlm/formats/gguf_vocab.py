"""What a GGUF vocabulary's fields mean, as llama.cpp reads them: token types, the pre-tokenizer regexes named by
``tokenizer.ggml.pre``, the token texts treated as control and end-of-turn tokens, GPT-2's byte alphabet.

Shared by the GGUF tokenizer (tokenizer.py), the Hugging Face one (tokenizer_hf.py) and the exporter that writes
an HF tokenizer as GGUF metadata (tokenizer_export.py).
"""

from __future__ import annotations

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")

# tokenizer.ggml.pre -> (regexes, ignore_merges, add_bos default), as in llama.cpp's llama-vocab.cpp
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", "[0-9][0-9][0-9]"), False, False),
    "gpt2": ((GPT2_REGEX,), False, False),
    "llama3": ((LLAMA3_REGEX,), True, True),
    "dbrx": ((LLAMA3_REGEX,), False, False),
    "qwen2": ((QWEN2_REGEX,), False, False),
    "smollm": ((r"\p{N}", GPT2_REGEX), False, False),
}
PRE_ALIASES = {
    "": "default", "gpt-2": "gpt2", "phi-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jina-es": "gpt2",
    "jina-de": "gpt2", "llama-v3": "llama3", "llama-bpe": "llama3", "falcon3": "llama3", "pixtral": "llama3",
    "smaug-bpe": "dbrx", "deepseek-r1-qwen": "qwen2", "stablelm2": "qwen2", "megrez": "qwen2",
    "starcoder": "smollm", "refact": "smollm", "command-r": "smollm", "codeshell": "smollm",
    "exaone": "smollm", "minerva-7b": "smollm",
}
# llama.cpp treats tokens with these texts as control tokens (and as end-of-generation)
CONTROL_LOOKING = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>",
    "<eos>", "<turn|>",
})
# the subset we stop generation on (llama.cpp also stops on e.g. Gemma's HTML "</s>" and FIM tokens)
END_OF_TURN = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, char -> byte."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(moved)}}
