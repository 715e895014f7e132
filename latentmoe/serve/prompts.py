"""From an API request to token ids: chat templates, BOS, and token texts for log-probabilities.

**Chat templates.** A Hugging Face checkpoint's ``tokenizer_config.json`` (or ``chat_template.jinja``) template
is rendered in jinja2's sandbox with its special tokens (``latentmoe.hf.tokenizer``). Checkpoints trained here
have a bare ``tokenizers.Tokenizer`` and no template: they are base models trained on plain text, so the
default template, :data:`DEFAULT_CHAT_TEMPLATE`, writes the messages' contents one per line, in order, and
nothing else — the model continues the last message's text::

    [{"role": "system", "content": "A play."}, {"role": "user", "content": "ROMEO:"}]   ->   "A play.\\nROMEO:"

**BOS.** A prompt's ids are ``[bos_token_id, *encode(text)]`` — what ``Engine`` does with a string prompt,
so a served completion equals ``Engine.generate`` on the same text — unless the rendered text already begins
with the BOS token (templates that write ``{{ bos_token }}``), which is not doubled. Token-id prompts are
taken as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_CHAT_TEMPLATE = (  # the newline is an expression: trim_blocks would eat one written after a tag
    "{% for message in messages %}{{ '\\n' if not loop.first else '' }}{{ message['content'] }}{% endfor %}"
)


def chat_template(tokenizer) -> tuple[str, dict[str, str], bool]:
    """``(template, special tokens, is_default)`` for ``tokenizer``: its own template when it has one."""
    own = getattr(tokenizer, "chat_template", None)
    if own:
        return own, dict(getattr(tokenizer, "special_tokens", {}) or {}), False
    return DEFAULT_CHAT_TEMPLATE, {}, True


def render_chat(tokenizer, messages: Sequence[dict[str, Any]]) -> str:
    """The prompt text of a conversation, with the generation prompt added (ValueError from a template that
    refuses the conversation, e.g. roles out of order)."""
    from latentmoe.hf.tokenizer import render_chat_template

    template, specials, _ = chat_template(tokenizer)
    return render_chat_template(template, list(messages), add_generation_prompt=True, **specials)


def encode_prompt(tokenizer, text: str, bos_token_id: int | None) -> list[int]:
    """``[bos, *ids]`` for ``text`` (see the module docstring)."""
    ids = list(tokenizer.encode(text).ids)
    if bos_token_id is None or (ids and ids[0] == bos_token_id):
        return ids
    return [bos_token_id, *ids]


def token_text(tokenizer, token_id: int) -> str:
    """What one token reads as (special tokens included; half a UTF-8 character reads as U+FFFD)."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    return inner.decode([token_id], skip_special_tokens=False)
