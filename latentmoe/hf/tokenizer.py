"""Tokenizer files of a Hugging Face checkpoint: ``tokenizer.json`` (the ``tokenizers`` library) and the
special tokens and chat template of ``tokenizer_config.json`` (rendered with jinja2 as transformers does).

**Prompt encoding: one rule, here.** :meth:`HFTokenizer.encode_prompt` (and :func:`encode_prompt` for anything
else) is the only place that decides whether a prompt gets BOS (or EOS); the engine, the server, ``latentmoe
generate`` and ``eval`` all call it. The rule is the tokenizer's own configuration:

1. ``tokenizer.json`` has a post-processor (a ``TemplateProcessing`` such as ``"<bos> $A"``): it decides, as in
   transformers (which, since version 5, writes ``add_bos_token`` into this post-processor and nowhere else) —
   ``tokenizers``' ``encode(text, add_special_tokens=True)``;
2. otherwise ``add_bos_token`` / ``add_eos_token`` of ``tokenizer_config.json`` (as llama.cpp's converter and
   transformers 4's Llama tokenizers read them); unstated means no;
3. our own runs' tokenizers (a bare ``tokenizer.json`` trained here) add BOS, because training frames every
   document ``BOS … EOS`` (latentmoe.data); :func:`as_hf_tokenizer` and :func:`load_run_tokenizer` say so with
   ``add_bos_token=True`` whatever an older run's tokenizer_config.json wrote.

A **chat** prompt is the rendered template, tokenised without adding anything (:meth:`HFTokenizer.encode_chat`,
what transformers' ``apply_chat_template(tokenize=True)`` does): the template decides, so a template that writes
``{{ bos_token }}`` gets one BOS, never two. Our exports write the rule down for the other runtimes:
tokenizer.json gets the post-processor that reproduces it and tokenizer_config.json ``add_bos_token`` /
``add_eos_token`` (:func:`save_tokenizer`); GGUF files ``tokenizer.ggml.add_bos_token`` / ``add_eos_token``.

**The default chat template.** A checkpoint without a template (our own runs, most base models) is rendered
with :data:`DEFAULT_CHAT_TEMPLATE` — the one place it is defined; chat fine-tuning (``latentmoe train --sft``),
the server, ``latentmoe generate --chat`` and the exports all take it through :func:`chat_template_of`. Every
turn is its role in ``<|...|>``, a newline, the content and the EOS token; the generation prompt is
``<|assistant|>`` and a newline::

    <|bos|><|system|>
    You are terse.<|eos|><|user|>
    Hi<|eos|><|assistant|>
    Hello.<|eos|>

The role markers are plain text (no new vocabulary); BOS and EOS are the tokenizer's own special tokens, so
a model trained on this stops generating at EOS. Chat templates come from the Hub and are untrusted code: they
run in jinja2's immutable sandbox.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, processors

from latentmoe.data.tokenizer import PAD_TOKEN
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

    def encode(self, text: str):
        """The ``tokenizers.Encoding`` of ``text`` (``.ids``), no special tokens added (pieces of a prompt)."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_prompt(self, text: str) -> list[int]:
        """The ids of a plain prompt, special tokens added by the tokenizer's own rule (module docstring)."""
        if self.tokenizer.post_processor is not None:
            return list(self.tokenizer.encode(text, add_special_tokens=True).ids)
        bos = self.special_id("bos_token") if self.add_bos_token else None
        eos = self.special_id("eos_token") if self.add_eos_token else None
        return [*([bos] if bos is not None else []), *self.encode(text).ids, *([eos] if eos is not None else [])]

    def encode_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        """The ids of a conversation: its chat template (or the default) rendered, tokenised as it stands."""
        return list(self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt)).ids)

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation under :func:`chat_template_of` (ValueError from a template that
        refuses it, e.g. roles out of order)."""
        template, _ = chat_template_of(self)
        variables = {"bos_token": "", "eos_token": "", **self.special_tokens}
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, **variables)

    def special_id(self, key: str) -> int | None:
        """The id of a special token named in ``special_tokens`` (``"bos_token"``), None when absent."""
        text = self.special_tokens.get(key)
        return self.tokenizer.token_to_id(text) if text is not None else None

    @property
    def adds_bos(self) -> bool:
        """Whether :meth:`encode_prompt` puts BOS first."""
        bos = self.special_id("bos_token")
        return bos is not None and self.encode_prompt("")[:1] == [bos]

    @property
    def adds_eos(self) -> bool:
        """Whether :meth:`encode_prompt` puts EOS last."""
        eos, specials = self.special_id("eos_token"), self.encode_prompt("")
        return eos is not None and specials[-1:] == [eos] and len(specials) > int(self.adds_bos)

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


def encode_prompt(tokenizer, text: str, *, bos_token_id: int | None) -> list[int]:
    """The ids of a plain prompt for any tokenizer: an :class:`HFTokenizer` by its own rule; a bare
    ``tokenizers.Tokenizer`` (one trained here) or a stand-in with ``encode(text).ids`` as our training frames
    documents, ``bos_token_id`` (the model config's) first."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.encode_prompt(text)
    if isinstance(tokenizer, Tokenizer):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    else:
        ids = tokenizer.encode(text).ids
    return [bos_token_id, *ids] if bos_token_id is not None else list(ids)


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


def load_run_tokenizer(ckpt: str | os.PathLike, *, config=None) -> HFTokenizer | None:
    """The tokenizer of one of our checkpoints (in the checkpoint directory or its run directory), with its
    ``tokenizer_config.json`` when there is one — special tokens and, after chat fine-tuning, the chat template the
    run rendered with — and our training's prompt encoding (BOS first, rule 3 of the module docstring). A bare
    tokenizer.json takes its special tokens from ``config`` (a ModelConfig); without ``config`` a bare one is
    None (the caller has only the ``tokenizers.Tokenizer``). None when there is no tokenizer.json."""
    ckpt = Path(ckpt)
    for directory in (ckpt, ckpt.parent):
        if (directory / TOKENIZER_NAME).is_file():
            tokenizer = load_tokenizer(directory)
            if not (directory / TOKENIZER_CONFIG_NAME).is_file() or not tokenizer.special_tokens:
                if config is None:
                    return None
                own = as_hf_tokenizer(tokenizer.tokenizer, config=config)
                tokenizer.special_tokens = {**own.special_tokens, **tokenizer.special_tokens}
            if tokenizer.tokenizer.post_processor is None:  # trained here: documents are framed BOS ... EOS
                tokenizer.add_bos_token, tokenizer.add_eos_token = True, False
            return tokenizer
    return None


def save_tokenizer(tokenizer: HFTokenizer | Tokenizer, path: str | os.PathLike, *, config=None) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, chat template) into ``path``.

    A bare ``tokenizers.Tokenizer`` (our trained BPE) gets its specials from ``config`` (a ModelConfig's
    ``bos_token_id`` / ``eos_token_id``) and the pad token if it has one named like ours.
    """
    path = Path(path)
    tokenizer = as_hf_tokenizer(tokenizer, config=config)
    exported(tokenizer).save(str(path / TOKENIZER_NAME))
    (path / TOKENIZER_CONFIG_NAME).write_text(tokenizer_config_text(tokenizer))
    return [path / TOKENIZER_NAME, path / TOKENIZER_CONFIG_NAME]


def exported(tokenizer: HFTokenizer) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` we write to an export's tokenizer.json: the tokenizer itself when its
    post-processor already decides, else a copy with a ``TemplateProcessing`` post-processor that adds what
    :meth:`HFTokenizer.encode_prompt` adds — transformers 5 reads the prompt rule from there only."""
    if tokenizer.tokenizer.post_processor is not None:
        return tokenizer.tokenizer
    single: list[str] = ["$A"]
    specials = []
    for key, flag, where in (("bos_token", tokenizer.add_bos_token, 0), ("eos_token", tokenizer.add_eos_token, 1)):
        token_id = tokenizer.special_id(key)
        if flag and token_id is not None:
            text = tokenizer.special_tokens[key]
            single.insert(len(single) if where else 0, text)
            if all(text != t for t, _ in specials):
                specials.append((text, token_id))
    if not specials:
        return tokenizer.tokenizer
    copy = Tokenizer.from_str(tokenizer.tokenizer.to_str())
    pair = [*single, *(f"{t}:1" if t != "$A" else "$B:1" for t in single)]
    copy.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return copy


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
    if tokenizer.token_to_id(PAD_TOKEN) is not None:
        specials["pad_token"] = PAD_TOKEN
    return HFTokenizer(tokenizer, special_tokens=specials, add_bos_token="bos_token" in specials, add_eos_token=False)


def tokenizer_config_text(tokenizer: HFTokenizer) -> str:
    """The ``tokenizer_config.json`` we write for ``tokenizer``: its special tokens, its prompt rule and the chat
    template we render with (the default when it has none, so every runtime renders chats as we do)."""
    out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.special_tokens}
    out["add_bos_token"] = tokenizer.adds_bos
    out["add_eos_token"] = tokenizer.adds_eos
    out["clean_up_tokenization_spaces"] = False
    if tokenizer.model_max_length is not None:
        out["model_max_length"] = tokenizer.model_max_length
    out["chat_template"] = chat_template_of(tokenizer)[0]  # the one latentmoe renders with, default included
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
