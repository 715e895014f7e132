"""Tokenizer files and chat templates, checked against transformers' AutoTokenizer on the same directory."""

from __future__ import annotations

import json

import pytest

from latentmoe.data.tokenizer import train_tokenizer
from latentmoe.hf import load_tokenizer, render_chat_template, save_pretrained, save_tokenizer
from tests.hf.helpers import ours

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# In the style of DeepSeek-V3's template: namespace, bos_token, loop, raise_exception, generation prompt, and
# block tags on their own lines (trim_blocks / lstrip_blocks decide the whitespace).
TEMPLATE = """{% set ns = namespace(system_prompt='') %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{% endif %}
{%- endfor %}
{{ bos_token }}{{ ns.system_prompt }}
{% for message in messages %}
    {% if message['role'] == 'user' %}
<｜User｜>{{ message['content'] }}
    {% elif message['role'] == 'assistant' %}
<｜Assistant｜>{{ message['content'] }}{{ eos_token }}
    {% elif message['role'] != 'system' %}
{{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"""
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Who wrote Hamlet?"},
    {"role": "assistant", "content": "Shakespeare."},
    {"role": "user", "content": "When?"},
]


@pytest.fixture(scope="module")
def trained():
    return train_tokenizer(TEXT, 300)


def test_our_tokenizer_saved_with_the_model_loads_in_transformers(tmp_path, trained):
    from transformers import AutoTokenizer

    model = ours("tiny")
    save_pretrained(model, tmp_path, tokenizer=trained)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    text = "whether 'tis nobler, or not"
    assert theirs(text, add_special_tokens=False)["input_ids"] == trained.encode(text).ids
    assert theirs.bos_token == "<|bos|>" and theirs.bos_token_id == model.config.bos_token_id
    assert theirs.eos_token_id == model.config.eos_token_id
    mine = load_tokenizer(tmp_path)
    assert mine.encode(text).ids == trained.encode(text).ids and mine.decode(mine.encode(text).ids) == text


def test_chat_template_renders_like_transformers(tmp_path, trained):
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    trained.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    trained.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": BOS, "special": True},  # DeepSeek writes this form
        "eos_token": {"__type": "AddedToken", "content": EOS, "special": True},
        "chat_template": TEMPLATE,
    }))
    mine, theirs = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for add in (True, False):
        expected = theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add)
        assert mine.apply_chat_template(CHAT, add_generation_prompt=add) == expected
    assert mine.apply_chat_template(CHAT).startswith(BOS + "You are terse.")


def test_template_saved_by_transformers_as_a_jinja_file_is_read(tmp_path, trained):
    from transformers import PreTrainedTokenizerFast

    theirs = PreTrainedTokenizerFast(tokenizer_object=trained, bos_token="<|bos|>", eos_token="<|eos|>")
    theirs.chat_template = TEMPLATE
    theirs.save_pretrained(tmp_path)
    mine = load_tokenizer(tmp_path)
    assert mine.special_tokens["bos_token"] == "<|bos|>"
    expected = theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert mine.apply_chat_template(CHAT) == expected


def test_resaving_keeps_the_template_and_specials(tmp_path, trained):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_tokenizer(trained, tmp_path / "a", config=ours("tiny").config)
    first = load_tokenizer(tmp_path / "a")
    first.chat_template = TEMPLATE
    save_tokenizer(first, tmp_path / "b")
    second = load_tokenizer(tmp_path / "b")
    assert second.special_tokens == {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    assert second.apply_chat_template(CHAT) == first.apply_chat_template(CHAT)


def test_template_errors_are_value_errors():
    with pytest.raises(ValueError, match="chat template: unknown role tool"):
        render_chat_template(TEMPLATE, [{"role": "tool", "content": "x"}], bos_token="", eos_token="")


def test_directory_without_tokenizer_has_none(tmp_path):
    assert load_tokenizer(tmp_path) is None


# ------------------------------------------------------------------------------- the prompt-encoding rule


def rule_dir(tmp_path, *, post: str | None, flags: dict) -> object:
    """A checkpoint tokenizer over a BPE trained here (<|bos|> = 0, <|eos|> = 1): tokenizer.json with the given
    TemplateProcessing post-processor (or none) and tokenizer_config.json with ``flags``."""
    from tokenizers import processors

    tok = train_tokenizer(TEXT, 300)
    if post is not None:
        tok.post_processor = processors.TemplateProcessing(single=post, special_tokens=[("<|bos|>", 0), ("<|eos|>", 1)])
    tmp_path.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>",
                                                                **flags}))
    return load_tokenizer(tmp_path), tok.encode("To be", add_special_tokens=False).ids


@pytest.mark.parametrize(("post", "flags", "head", "tail"), [
    (None, {}, [], []),                                                  # nothing stated: nothing added
    (None, {"add_bos_token": True}, [0], []),                            # the flags, without a post-processor
    (None, {"add_bos_token": True, "add_eos_token": True}, [0], [1]),
    ("<|bos|> $A", {}, [0], []),                                         # the post-processor decides ...
    ("<|bos|> $A", {"add_bos_token": False}, [0], []),                   # ... over the flags (transformers 5)
    ("$A", {"add_bos_token": True}, [], []),
    ("<|bos|> $A <|eos|>", {}, [0], [1]),
])
def test_the_prompt_rule_is_the_tokenizers_own(tmp_path, post, flags, head, tail):
    mine, body = rule_dir(tmp_path / "t", post=post, flags=flags)
    assert mine.encode_prompt("To be") == [*head, *body, *tail]
    assert (mine.adds_bos, mine.adds_eos) == (bool(head), bool(tail))


@pytest.mark.parametrize("flags", [{"add_bos_token": True}, {"add_bos_token": False}, {}])
def test_a_saved_tokenizer_makes_transformers_encode_as_we_do(tmp_path, flags):
    """save_tokenizer writes the rule where transformers 5 reads it (the post-processor) and in the flags."""
    from transformers import AutoTokenizer

    mine, _ = rule_dir(tmp_path / "src", post=None, flags=flags)
    (tmp_path / "out").mkdir()
    save_tokenizer(mine, tmp_path / "out")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert saved["add_bos_token"] is bool(flags.get("add_bos_token"))
    reloaded = load_tokenizer(tmp_path / "out")
    for text in ("To be", "the question", ""):
        assert theirs(text).input_ids == mine.encode_prompt(text) == reloaded.encode_prompt(text)


def test_our_bare_tokenizer_puts_bos_first_and_exports_so(tmp_path):
    from latentmoe.hf.tokenizer import as_hf_tokenizer, encode_prompt

    model = ours("tiny", vocab_size=300)
    bare = train_tokenizer(TEXT, 300)
    body = bare.encode("To be", add_special_tokens=False).ids
    assert encode_prompt(bare, "To be", bos_token_id=0) == [0, *body]
    assert as_hf_tokenizer(bare, config=model.config).encode_prompt("To be") == [0, *body]
    save_tokenizer(bare, tmp_path, config=model.config)
    assert load_tokenizer(tmp_path).encode_prompt("To be") == [0, *body]
