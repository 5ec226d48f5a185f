"""Tokenizer loading and prompt encoding (raw text or chat messages through the chat template)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

# The roles the served chat template renders (the OpenAI request schema and calibration files).
ChatRole = Literal["system", "user", "assistant"]
CHAT_ROLES: tuple[str, ...] = get_args(ChatRole)


def load_tokenizer(model_dir: str | Path) -> Any:
    """The HF tokenizer of `model_dir` (tokenization is not model code; transformers is fine here)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of `messages` (and the OpenAI `tools`, if any) rendered with the chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; send a raw prompt instead")
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                        tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a raw prompt, as-is (no chat template, no special tokens added)."""
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
