"""Chat fine-tuning (``--init-from RUN --sft chats.jsonl``): a few steps lower the loss on the assistant's tokens
(measured position by position, independently of the masked loss), and the run keeps the template it used."""

from __future__ import annotations

import json

import torch

from latentmoe.checkpoint import load_model
from latentmoe.hf import DEFAULT_CHAT_TEMPLATE, load_tokenizer
from latentmoe.train.run import train_on_corpus
from tests.train.conftest import tiny_cfg

QUESTIONS = ("Who is the prince of Denmark?", "Who killed the king?", "What did the ghost ask?",
             "Where does the play take place?", "Who loved Ophelia?", "Who is Horatio?")
ANSWER = "Hamlet, my good lord."
SEQ = 64


def write_chats(path):
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]})
             for q in QUESTIONS]
    path.write_text("\n".join(lines) + "\n")
    return path


@torch.no_grad()
def assistant_loss(model, chat) -> float:
    """Mean -log p(token) over every assistant token of every training conversation, one position at a time."""
    model.eval()
    terms = []
    for index in chat.train_indices.tolist():
        ids, mask = chat.conversation(int(index))
        log_p = model(torch.from_numpy(ids)[None], compute_mtp=False).logits[0].double().log_softmax(-1)
        terms += [-float(log_p[i, ids[i + 1]]) for i in range(ids.size - 1) if mask[i + 1]]
    return sum(terms) / len(terms)


def test_a_few_sft_steps_lower_the_assistant_token_loss(tmp_path, source_run):
    source, _ = source_run
    chats = write_chats(tmp_path / "chats.jsonl")
    result, run = train_on_corpus(tiny_cfg(tmp_path / "chat", steps=12, seq_len=SEQ, lr=3e-3), init_from=source.out_dir,
                                  sft=chats, sft_val_fraction=0.0, progress=False)
    chat = run.chat
    assert chat.num_train == len(QUESTIONS) and chat.truncated(SEQ) == 0
    before = assistant_loss(load_model(source.checkpoint)[0], chat)
    after = assistant_loss(load_model(result.checkpoint)[0], chat)
    assert after < 0.6 * before, (before, after)
    saved = load_tokenizer(tmp_path / "chat")
    assert saved.chat_template == DEFAULT_CHAT_TEMPLATE  # what the run rendered with, kept for chatting
    assert saved.special_tokens["eos_token"] == "<|eos|>"
    assert result.data.manifest_sha256 == chat.sha256 and run.label == str(chats)
    # whoever loads the run (generate, a server) or exports it gets that template too
    from latentmoe import load
    from latentmoe.hf import convert

    _, loaded = load(tmp_path / "chat")
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE
    convert(tmp_path / "chat", tmp_path / "hf", to="hf")
    assert load_tokenizer(tmp_path / "hf").chat_template == DEFAULT_CHAT_TEMPLATE
