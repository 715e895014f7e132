"""Chat data: conversations rendered by a template, the assistant-token mask on a hand-made example, the masked loss
against a per-position loop, padded rows, and one-line errors for bad records."""

from __future__ import annotations

import json
import math

import pytest
import torch

from latentmoe.data.chat import ChatDataset, chat_segments, tokenize_chat
from latentmoe.data.sources import DataSourceError
from latentmoe.hf.tokenizer import DEFAULT_CHAT_TEMPLATE, render_chat_template
from latentmoe.model.mtp import causal_lm_loss
from latentmoe.model.transformer import CausalLMOutput
from tests.hf.test_tokenizer import TEMPLATE as DEEPSEEK_STYLE_TEMPLATE

SPECIALS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>"}
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Who wrote Hamlet?"},
    {"role": "assistant", "content": "Shakespeare."},
    {"role": "user", "content": "When?"},
    {"role": "assistant", "content": "About 1600."},
]
# The default template's rendering of CHAT, cut by hand into what the user side and the assistant side wrote.
HAND_SEGMENTS = [
    ("<|bos|><|system|>\nYou are terse.<|eos|><|user|>\nWho wrote Hamlet?<|eos|><|assistant|>\n", False),
    ("Shakespeare.<|eos|>", True),
    ("<|user|>\nWhen?<|eos|><|assistant|>\n", False),
    ("About 1600.<|eos|>", True),
]


def renderer(template: str, specials: dict[str, str] = SPECIALS):
    def render(messages, *, add_generation_prompt):
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, **specials)

    return render


def encoder(tokenizer):
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def test_the_mask_covers_exactly_the_assistant_turns_of_a_hand_made_chat(small_tokenizer):
    segments = chat_segments(CHAT, renderer(DEFAULT_CHAT_TEMPLATE))
    assert [(s.text, s.assistant) for s in segments] == HAND_SEGMENTS
    ids, mask = tokenize_chat(segments, encoder(small_tokenizer))
    expected_ids, expected_mask = [], []
    for text, assistant in HAND_SEGMENTS:
        piece = small_tokenizer.encode(text, add_special_tokens=False).ids
        expected_ids += piece
        expected_mask += [assistant] * len(piece)
    assert ids.tolist() == expected_ids and mask.tolist() == expected_mask
    answer = small_tokenizer.decode(ids[mask].tolist(), skip_special_tokens=False)
    assert answer == "Shakespeare.<|eos|>About 1600.<|eos|>"
    assert ids[0] == small_tokenizer.token_to_id("<|bos|>")
    assert ids[mask][-1] == small_tokenizer.token_to_id("<|eos|>")  # the model learns to stop


def test_a_deepseek_style_template_splits_into_its_assistant_turns():
    specials = {"bos_token": "<B>", "eos_token": "<E>"}
    render = renderer(DEEPSEEK_STYLE_TEMPLATE, specials)
    segments = chat_segments(CHAT, render)
    assert "".join(s.text for s in segments) == render(CHAT, add_generation_prompt=False)
    # this template ends every message's line with a newline: the assistant turn is its text up to the next turn
    assert [s.text for s in segments if s.assistant] == ["Shakespeare.<E>\n", "About 1600.<E>\n"]


def test_a_template_that_rewrites_earlier_turns_is_refused():
    counting = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="does not render turn by turn"):
        chat_segments(CHAT, renderer(counting))


def naive_masked_loss(logits_SV: torch.Tensor, ids_S: torch.Tensor, mask_S: torch.Tensor, ahead: int) -> float:
    """Mean of -log p(t_{i+ahead}) over the positions i whose target is marked, one position at a time."""
    terms = []
    for i in range(ids_S.numel() - ahead):
        if mask_S[i + ahead]:
            log_p = logits_SV[i].double().log_softmax(-1)
            terms.append(-float(log_p[ids_S[i + ahead]]))
    return sum(terms) / len(terms)


def test_masked_main_and_mtp_losses_count_only_assistant_targets(small_tokenizer):
    ids, mask = tokenize_chat(chat_segments(CHAT, renderer(DEFAULT_CHAT_TEMPLATE)), encoder(small_tokenizer))
    ids_BS, mask_BS = torch.from_numpy(ids)[None], torch.from_numpy(mask)[None]
    V = small_tokenizer.get_vocab_size()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, ids.size, V, generator=g, requires_grad=True)
    mtp = torch.randn(1, ids.size, V, generator=g)
    loss = causal_lm_loss(CausalLMOutput(logits, [mtp]), ids_BS, mtp_lambda=0.3, loss_mask_BS=mask_BS)
    main = naive_masked_loss(logits[0].detach(), ids_BS[0], mask_BS[0], 1)
    depth1 = naive_masked_loss(mtp[0], ids_BS[0], mask_BS[0], 2)
    assert float(loss.main.detach()) == pytest.approx(main, rel=1e-6)
    assert float(loss.mtp[0]) == pytest.approx(depth1, rel=1e-6)
    assert float(loss.total.detach()) == pytest.approx(main + 0.3 * depth1, rel=1e-6)
    loss.main.backward()
    scored = logits.grad[0].abs().sum(-1) > 0
    assert scored.tolist() == [bool(mask[i + 1]) if i + 1 < ids.size else False for i in range(ids.size)]


def write_chats(path, chats):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return path


def test_rows_are_padded_truncated_and_split_over_ranks(tmp_path, small_tokenizer):
    chats = [CHAT, CHAT[:3], [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "ok"}]]
    data = ChatDataset.from_jsonl(write_chats(tmp_path / "c.jsonl", chats), render=renderer(DEFAULT_CHAT_TEMPLATE),
                                  encode=encoder(small_tokenizer), pad_id=2, val_fraction=0.0)
    assert (data.num_train, data.num_val) == (3, 0)
    seq = 64  # conversation 1 fits (57 tokens), 0 and 2 (89, 222) are cut
    rows = data.rows([1, 0], seq_len=seq)
    ids1, mask1 = data.conversation(1)
    n = ids1.size
    assert n < seq
    assert rows.ids[0, :n].tolist() == ids1.tolist() and rows.ids[0, n:].tolist() == [2] * (seq - n)
    assert rows.loss_mask[0, :n].tolist() == mask1.tolist() and not rows.loss_mask[0, n:].any()
    ids0, mask0 = data.conversation(0)
    assert rows.ids[1].tolist() == ids0[:seq].tolist() and data.truncated(seq) == 2
    whole = data.batch(3, batch_size=4, seq_len=seq, seed=1)
    halves = [data.batch(3, batch_size=4, seq_len=seq, seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat([h.ids for h in halves]), whole.ids)
    assert torch.equal(torch.cat([h.loss_mask for h in halves]), whole.loss_mask)
    sequential = data.batch(1, batch_size=2, seq_len=seq, seed=0, sampling="sequential")
    assert torch.equal(sequential.ids, data.rows([2, 0], seq_len=seq).ids)  # slots (1·2 + b) mod 3


def test_validation_conversations_are_chosen_by_content(tmp_path, small_tokenizer):
    chats = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
             for i in range(40)]
    kw = dict(render=renderer(DEFAULT_CHAT_TEMPLATE), encode=encoder(small_tokenizer), pad_id=2, val_fraction=0.25)
    first = ChatDataset.from_jsonl(write_chats(tmp_path / "a.jsonl", chats), **kw)
    again = ChatDataset.from_jsonl(write_chats(tmp_path / "b.jsonl", chats[::-1]), **kw)
    assert 0 < first.num_val < 40
    val_a = {tuple(first.conversation(i)[0].tolist()) for i in first.val_indices}
    val_b = {tuple(again.conversation(i)[0].tolist()) for i in again.val_indices}
    assert val_a == val_b  # the order of the file does not move a conversation between splits
    assert math.isclose(first.num_val / 40, 0.25, abs_tol=0.2)


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "c.jsonl:2: not a JSON object"),
        ('{"text": "hi"}', 'c.jsonl:2: expected {"messages"'),
        ('{"messages": [{"role": "user"}]}', "c.jsonl:2: message 0 needs a string 'role' and 'content'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "c.jsonl:2: no assistant message"),
    ],
)
def test_bad_records_name_the_file_and_line(tmp_path, small_tokenizer, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + line + "\n")
    with pytest.raises(DataSourceError) as info:
        ChatDataset.from_jsonl(path, render=renderer(DEFAULT_CHAT_TEMPLATE), encode=encoder(small_tokenizer),
                               pad_id=2)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_and_empty_files(tmp_path, small_tokenizer):
    kw = dict(render=renderer(DEFAULT_CHAT_TEMPLATE), encode=encoder(small_tokenizer), pad_id=2)
    with pytest.raises(DataSourceError, match="no such file"):
        ChatDataset.from_jsonl(tmp_path / "missing.jsonl", **kw)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataSourceError, match="no conversations"):
        ChatDataset.from_jsonl(tmp_path / "empty.jsonl", **kw)
