"""From an API request to token ids: chat templates, BOS, and token texts for log-probabilities.

Both rules live in latentmoe.hf.tokenizer, once, for every path (engine, server, ``generate``, ``eval``):

- **Completions** (a string prompt): :func:`latentmoe.hf.tokenizer.encode_prompt` — the tokenizer's own
  configuration decides BOS/EOS (its tokenizer.json post-processor, else tokenizer_config.json's
  ``add_bos_token``/``add_eos_token``; our own runs put BOS first, as training frames documents). A served
  completion therefore equals ``Engine.generate`` on the same text, and transformers / llama.cpp on our exports.
- **Chat** (messages): the checkpoint's chat template, else :data:`latentmoe.hf.tokenizer.DEFAULT_CHAT_TEMPLATE`
  (the one default, also used by ``train --sft``), rendered in jinja2's sandbox with the tokenizer's special
  tokens and tokenised as it stands — the template decides about BOS, so it is never doubled.

Token-id prompts are taken as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer

from latentmoe.hf.tokenizer import HFTokenizer, as_hf_tokenizer, chat_template_of, render_chat_template
from latentmoe.hf.tokenizer import encode_prompt as _encode_prompt


def chat_tokenizer(tokenizer, *, bos_token_id: int | None, eos_token_id: int | None):
    """``tokenizer`` as an :class:`HFTokenizer` (a bare one gets the model's BOS/EOS as its special tokens);
    a stand-in that is neither is returned as it is."""
    if isinstance(tokenizer, Tokenizer):
        return as_hf_tokenizer(tokenizer, config=_Specials(bos_token_id, eos_token_id))
    return tokenizer


class _Specials:
    def __init__(self, bos_token_id: int | None, eos_token_id: int | None):
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id


def render_chat(tokenizer, messages: Sequence[dict[str, Any]], *, bos_token_id: int | None = None,
                eos_token_id: int | None = None) -> str:
    """The prompt text of a conversation, with the generation prompt added (ValueError from a template that
    refuses the conversation, e.g. roles out of order)."""
    tok = chat_tokenizer(tokenizer, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if isinstance(tok, HFTokenizer):
        return tok.render_chat(list(messages), add_generation_prompt=True)
    template, _ = chat_template_of(None)
    return render_chat_template(template, list(messages), add_generation_prompt=True, bos_token="", eos_token="")


def encode_chat(tokenizer, messages: Sequence[dict[str, Any]], *, bos_token_id: int | None,
                eos_token_id: int | None) -> list[int]:
    """The ids of a conversation: rendered by :func:`render_chat`, tokenised without adding anything."""
    text = render_chat(tokenizer, messages, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    tok = chat_tokenizer(tokenizer, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    return list(tok.encode(text).ids)


def encode_prompt(tokenizer, text: str, bos_token_id: int | None) -> list[int]:
    """The ids of a plain (completion) prompt: :func:`latentmoe.hf.tokenizer.encode_prompt`."""
    return _encode_prompt(tokenizer, text, bos_token_id=bos_token_id)


def token_text(tokenizer, token_id: int) -> str:
    """What one token reads as (special tokens included; half a UTF-8 character reads as U+FFFD)."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    return inner.decode([token_id], skip_special_tokens=False)
