"""Tokenizer files of a Hugging Face checkpoint: ``tokenizer.json`` (the ``tokenizers`` library) and the
special tokens and chat template of ``tokenizer_config.json`` (rendered with jinja2 as transformers does).

:class:`HFTokenizer` encodes *without* adding special tokens — whoever builds the prompt adds BOS (our
``generate_text`` does, from the model config) and chat templates spell their specials out themselves.
Chat templates come from the Hub and are untrusted code: they run in jinja2's immutable sandbox.

**The default chat template.** A checkpoint without a template (our own runs, most base models) is rendered
with :data:`DEFAULT_CHAT_TEMPLATE` — the one place it is defined; chat fine-tuning (``latentmoe train --sft``)
and the server both take it through :func:`chat_template_of`. Every turn is its role in ``<|...|>``, a newline,
the content and the EOS token; the generation prompt is ``<|assistant|>`` and a newline::

    <|bos|><|system|>
    You are terse.<|eos|><|user|>
    Hi<|eos|><|assistant|>
    Hello.<|eos|>

The role markers are plain text (no new vocabulary); BOS and EOS are the tokenizer's own special tokens, so
a model trained on this stops generating at EOS.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from latentmoe.hf.errors import HFCheckpointError
from latentmoe.io import one_line, read_json

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"  # transformers 5 writes the template here instead
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass
class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with the special tokens and chat template of its ``tokenizer_config.json``.

    special_tokens: e.g. ``{"bos_token": "<｜begin▁of▁sentence｜>", ...}`` (strings; absent ones left out).
    """

    tokenizer: Tokenizer
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    model_max_length: int | None = None
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None

    @property
    def adds_bos(self) -> bool:
        """Whether a prompt starts with BOS (``add_bos_token`` of tokenizer_config.json; unstated: no)."""
        return bool(self.add_bos_token) and "bos_token" in self.special_tokens

    @property
    def adds_eos(self) -> bool:
        return bool(self.add_eos_token) and "eos_token" in self.special_tokens

    def encode(self, text: str):
        """The ``tokenizers.Encoding`` of ``text`` (``.ids``), no special tokens added."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for a chat (``[{"role": "user", "content": "..."}, ...]``)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json has no chat_template)")
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **kwargs},
        )


def chat_template_of(tokenizer: HFTokenizer | None) -> tuple[str, bool]:
    """``(template, is_default)``: the tokenizer's chat template, or :data:`DEFAULT_CHAT_TEMPLATE` when it has
    none (or there is no tokenizer config at all)."""
    if tokenizer is not None and tokenizer.chat_template is not None:
        return tokenizer.chat_template, False
    return DEFAULT_CHAT_TEMPLATE, True


def render_chat_template(
    template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False, **variables: Any
) -> str:
    """Render a Hugging Face chat template: jinja2 sandbox, ``trim_blocks`` + ``lstrip_blocks``, loop controls,
    and the helpers templates expect (``raise_exception``, ``strftime_now``, a non-escaping ``tojson``)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.exceptions.TemplateError as exc:
        raise ValueError(f"chat template: {exc}") from None


def load_tokenizer(path: str | os.PathLike) -> HFTokenizer | None:
    """The tokenizer of a checkpoint directory, or None when it has no ``tokenizer.json``."""
    path = Path(path)
    tokenizer_path = path / TOKENIZER_NAME
    if not tokenizer_path.is_file():
        return None
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise HFCheckpointError(f"{tokenizer_path}: not a valid tokenizer ({one_line(exc)})") from None
    config_path = path / TOKENIZER_CONFIG_NAME
    config: dict[str, Any] = {}
    if config_path.is_file():
        config = read_json(config_path, error=HFCheckpointError)
        if not isinstance(config, dict):
            raise HFCheckpointError(f"{config_path}: not a JSON object")
    template = _chat_template(config.get("chat_template"), config_path)
    if (path / CHAT_TEMPLATE_NAME).is_file():
        template = (path / CHAT_TEMPLATE_NAME).read_text()
    specials = {k: t for k in SPECIAL_KEYS if (t := _token_text(config.get(k))) is not None}
    max_length = config.get("model_max_length")
    flags = {k: v for k in ("add_bos_token", "add_eos_token") if isinstance(v := config.get(k), bool)}
    return HFTokenizer(
        tokenizer,
        chat_template=template,
        special_tokens=specials,
        model_max_length=max_length if isinstance(max_length, int) and max_length < 10**12 else None,
        **flags,
    )


def load_run_tokenizer(ckpt: str | os.PathLike) -> HFTokenizer | None:
    """The tokenizer of one of our checkpoints *with* its ``tokenizer_config.json`` — special tokens and, after
    chat fine-tuning, the chat template the run rendered with — when one lies beside the ``tokenizer.json`` (in
    the checkpoint directory or its run directory); None when there is no such config (a bare tokenizer.json)."""
    ckpt = Path(ckpt)
    for directory in (ckpt, ckpt.parent):
        if (directory / TOKENIZER_NAME).is_file():
            return load_tokenizer(directory) if (directory / TOKENIZER_CONFIG_NAME).is_file() else None
    return None


def save_tokenizer(tokenizer: HFTokenizer | Tokenizer, path: str | os.PathLike, *, config=None) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, chat template) into ``path``.

    A bare ``tokenizers.Tokenizer`` (our trained BPE) gets its specials from ``config`` (a ModelConfig's
    ``bos_token_id`` / ``eos_token_id``) and the pad token if it has one named like ours.
    """
    path = Path(path)
    tokenizer = as_hf_tokenizer(tokenizer, config=config)
    tokenizer.tokenizer.save(str(path / TOKENIZER_NAME))
    (path / TOKENIZER_CONFIG_NAME).write_text(tokenizer_config_text(tokenizer))
    return [path / TOKENIZER_NAME, path / TOKENIZER_CONFIG_NAME]


def as_hf_tokenizer(tokenizer: HFTokenizer | Tokenizer, *, config=None) -> HFTokenizer:
    """``tokenizer`` itself, or a bare ``tokenizers.Tokenizer`` (our trained BPE) with the special tokens of
    ``config`` (a ModelConfig's ``bos_token_id`` / ``eos_token_id``), the pad token if it has one named like ours,
    and our prompt encoding: BOS first, as training frames every document."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer
    specials = {}
    if config is not None:
        for key, token_id in (("bos_token", config.bos_token_id), ("eos_token", config.eos_token_id)):
            if token_id is not None and (text := tokenizer.id_to_token(token_id)) is not None:
                specials[key] = text
    if tokenizer.token_to_id("<|pad|>") is not None:
        specials["pad_token"] = "<|pad|>"
    return HFTokenizer(tokenizer, special_tokens=specials, add_bos_token="bos_token" in specials, add_eos_token=False)


def tokenizer_config_text(tokenizer: HFTokenizer) -> str:
    """The ``tokenizer_config.json`` we write for ``tokenizer``: its special tokens and chat template."""
    out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.special_tokens}
    out["add_bos_token"] = False
    out["add_eos_token"] = False
    out["clean_up_tokenization_spaces"] = False
    if tokenizer.model_max_length is not None:
        out["model_max_length"] = tokenizer.model_max_length
    if tokenizer.chat_template is not None:
        out["chat_template"] = tokenizer.chat_template
    return json.dumps(out, indent=2, ensure_ascii=False) + "\n"


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _chat_template(value: Any, source: Path) -> str | None:
    """``chat_template``: a string, or a list of ``{"name", "template"}`` (the one named "default" is used)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise HFCheckpointError(f"{source}: chat_template is neither a string nor a list with a 'default' template")
