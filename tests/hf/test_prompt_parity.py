"""Same prompt, same text, in every runtime (greedy): our checkpoint exported with ``convert --to hf`` generates in
transformers (AutoTokenizer + AutoModelForCausalLM.generate) what ``latentmoe generate`` prints, for plain and chat
prompts; a DeepSeek-V3 model and tokenizer made with transformers (add_bos_token true and false, its own chat
template) generate in latentmoe what they generate in transformers; ``eval`` and the server's echo + logprobs score
a text as transformers does on the export; and, when llama-cpp-python is importable, llama.cpp on our GGUF export
generates the same text."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from latentmoe.checkpoint import save_checkpoint
from latentmoe.cli import main
from latentmoe.data.tokenizer import train_tokenizer
from tests.hf.helpers import hf_v3, ours

TEXT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
        "JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name. ") * 8
PLAIN = ["ROMEO:", "JULIET: O Romeo", "It is the east, and", "What light"]
CHATS = ["Who is the sun?", "Deny thy father"]
NEW_TOKENS = 8
BOS, EOS = "<|bos|>", "<|eos|>"


def cli_text(capsys, *args) -> str:
    """stdout of ``latentmoe generate ...`` without its trailing newline."""
    capsys.readouterr()
    assert main(["generate", *map(str, args)]) == 0
    return capsys.readouterr().out.removesuffix("\n")


def greedy(capsys, checkpoint, prompt, *, chat=False) -> str:
    extra = ["--chat"] if chat else []
    return cli_text(capsys, "--checkpoint", checkpoint, "--prompt", prompt, "--max-tokens", NEW_TOKENS,
                    "--temperature", 0, *extra)


def hf_generate(model, tokenizer, ids: list[int]) -> str:
    """transformers' greedy continuation of ``ids`` (stopping at EOS, as ours does), decoded without specials."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Our run (random tiny model + a tokenizer trained here) and its ``convert --to hf`` export, loaded by
    transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("parity")
    model = ours("tiny", vocab_size=300)
    save_checkpoint(root / "run", 5, model, None, {}, model.config)
    train_tokenizer(TEXT, 300).save(str(root / "run" / "tokenizer.json"))
    assert main(["convert", str(root / "run"), str(root / "hf"), "--to", "hf", "--dtype", "fp32"]) == 0
    hf_tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    return root, model, hf_tokenizer, hf_model


def test_the_export_says_bos_as_we_train(exported):
    root, model, hf_tokenizer, _ = exported
    config = json.loads((root / "hf" / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    ids = hf_tokenizer("ROMEO:").input_ids
    assert ids[0] == model.config.bos_token_id and ids.count(model.config.bos_token_id) == 1


def test_a_prompt_of_ours_is_encoded_as_training_frames_a_document(exported):
    """Our runs' rule (BOS first) is the data pipeline's framing (BOS ids EOS) without the closing EOS."""
    from latentmoe.data.batching import encode_documents
    from latentmoe.pretrained import load

    root, model, hf_tokenizer, _ = exported
    _, tokenizer = load(root / "run")
    for text in PLAIN:
        framed = encode_documents(tokenizer.tokenizer, [text]).tolist()
        assert framed[-1] == model.config.eos_token_id
        assert tokenizer.encode_prompt(text) == framed[:-1] == hf_tokenizer(text).input_ids


@pytest.mark.parametrize("prompt", PLAIN)
def test_our_export_generates_in_transformers_what_latentmoe_generate_prints(exported, capsys, prompt):
    root, _, hf_tokenizer, hf_model = exported
    theirs = hf_generate(hf_model, hf_tokenizer, hf_tokenizer(prompt).input_ids)
    assert greedy(capsys, root / "run", prompt) == prompt + theirs
    assert greedy(capsys, root / "hf", prompt) == prompt + theirs  # and from the export itself


@pytest.mark.parametrize("content", CHATS)
def test_our_export_answers_a_chat_in_transformers_as_latentmoe_generate_chat(exported, capsys, content):
    root, model, hf_tokenizer, hf_model = exported
    messages = [{"role": "user", "content": content}]
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    assert ids.count(model.config.bos_token_id) == 1  # the default template writes BOS; nothing adds another
    assert greedy(capsys, root / "run", content, chat=True) == hf_generate(hf_model, hf_tokenizer, ids)


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i = 1 .. n-1, from transformers, in float64."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_eval_scores_a_text_as_transformers_does_on_the_export(exported, tmp_path, capsys):
    root, model, hf_tokenizer, hf_model = exported
    text = "JULIET: O Romeo, Romeo, wherefore art thou Romeo?"
    (tmp_path / "doc.txt").write_text(text)
    stream = [*hf_tokenizer(text).input_ids, model.config.eos_token_id]  # a document: prompt rule, then EOS
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(root / "run"), "--data", str(tmp_path / "doc.txt"), "--seq-len",
                 str(len(stream)), "--batch-size", "1", "--json"]) == 0
    ours_eval = json.loads(capsys.readouterr().out)
    theirs = hf_logprobs(hf_model, stream)
    assert ours_eval["tokens"] == len(stream) - 1
    assert ours_eval["loss"] == pytest.approx(-float(theirs.mean()), rel=1e-5)


def test_server_echo_logprobs_equal_transformers_per_token_on_the_export(exported):
    from latentmoe.pretrained import load
    from tests.serve.conftest import local_backend, serving
    from tests.serve.helpers import post

    root, _, hf_tokenizer, hf_model = exported
    text = "ROMEO: But soft, what light"
    ids = hf_tokenizer(text).input_ids
    model, tokenizer = load(root / "run")
    with serving(local_backend(model, tokenizer, speculative=False)) as server:
        status, _, body = post(server.url, "/v1/completions", {"model": "tiny", "prompt": text, "max_tokens": 1,
                                                              "temperature": 0, "echo": True, "logprobs": 1})
    assert status == 200, body
    lp = body["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids) + 1
    theirs = hf_logprobs(hf_model, ids)
    for i, value in enumerate(theirs.tolist(), start=1):
        assert math.isclose(lp["token_logprobs"][i], value, rel_tol=1e-5, abs_tol=1e-5), i


# ------------------------------------------------------------------------- their checkpoints in latentmoe

HF_TEMPLATE = ("{% for m in messages %}{{ bos_token if loop.first else '' }}### {{ m['role'] }}: {{ m['content'] }}"
               "\n{% endfor %}{% if add_generation_prompt %}### assistant:{% endif %}")


@pytest.fixture(scope="module", params=[True, False], ids=["add_bos", "no_bos"])
def theirs(request, tmp_path_factory):
    """A tiny transformers DeepSeek-V3 model and a tokenizer built with transformers (PreTrainedTokenizerFast over
    a BPE trained here) with ``add_bos_token`` as given and a chat template of its own, saved by transformers."""
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("theirs")
    model = hf_v3(seed=3, vocab_size=320)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(TEXT, 300), bos_token=BOS, eos_token=EOS,
                                        add_bos_token=request.param, add_eos_token=False, chat_template=HF_TEMPLATE)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    return root / "hf", model, tokenizer, request.param


@pytest.mark.parametrize("prompt", PLAIN)
def test_their_checkpoint_generates_in_latentmoe_what_it_generates_in_transformers(theirs, capsys, prompt):
    path, model, tokenizer, add_bos = theirs
    ids = tokenizer(prompt).input_ids
    assert (ids[0] == tokenizer.bos_token_id) == add_bos
    assert greedy(capsys, path, prompt) == prompt + hf_generate(model, tokenizer, ids)


@pytest.mark.parametrize("content", CHATS)
def test_their_chat_template_answers_in_latentmoe_as_in_transformers(theirs, capsys, content):
    path, model, tokenizer, _ = theirs
    messages = [{"role": "user", "content": content}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    assert ids.count(tokenizer.bos_token_id) == 1  # the template's own BOS, whatever add_bos_token says
    assert greedy(capsys, path, content, chat=True) == hf_generate(model, tokenizer, ids)


def test_their_prompt_ids_are_what_transformers_encodes(theirs):
    from latentmoe.hf import load_tokenizer

    path, _, tokenizer, _ = theirs
    mine = load_tokenizer(path)
    for prompt in PLAIN:
        assert mine.encode_prompt(prompt) == tokenizer(prompt).input_ids
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": CHATS[0]}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert mine.encode_chat(messages) == list(ids["input_ids"] if isinstance(ids, dict) else ids)


# ------------------------------------------------------------------------------------------- llama.cpp

LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed (optional, built from source); "
                    "the GGUF file itself is checked in test_gguf.py")
def test_our_gguf_generates_in_llama_cpp_what_latentmoe_generate_prints(exported, capsys, tmp_path):
    """Plain prompts: token ids equal, and the text llama.cpp's detokeniser gives them (U+FFFD for the bytes of
    an incomplete UTF-8 character, which a random model emits, as our decoder writes them; llama-cpp-python's
    create_completion drops such bytes and counts tokens differently, so its text is not what is compared).
    Chats: llama-cpp-python renders the file's chat template to the same prompt tokens and the same reply."""
    from llama_cpp import Llama

    from latentmoe.infer import Engine, SamplingParams
    from latentmoe.pretrained import load

    root, _, _, _ = exported
    out = tmp_path / "m.gguf"
    assert main(["convert", str(root / "run"), str(out), "--to", "gguf", "--dtype", "f32"]) == 0
    llm = Llama(model_path=str(out), n_ctx=128, n_threads=1, verbose=False, type_k=0, type_v=0)  # f32 KV cache
    model, tokenizer = load(root / "run")
    eos = model.config.eos_token_id
    for prompt in PLAIN:
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)  # add_bos: the file's rule
        mine = Engine(model, tokenizer).generate([prompt], SamplingParams(max_tokens=NEW_TOKENS, temperature=0,
                                                                          stop_token_ids=(eos,)))[0]
        assert ids == mine.prompt_token_ids  # llama.cpp tokenises as we do, BOS included
        llm.reset()
        theirs = []
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            theirs.append(token)
            if token == eos or len(theirs) == NEW_TOKENS:
                break
        assert theirs == mine.token_ids, prompt
        text = llm.detokenize([t for t in theirs if t != eos]).decode("utf-8", errors="replace")
        assert greedy(capsys, root / "run", prompt) == prompt + text
    for content in CHATS:  # llama-cpp-python renders the file's chat template (ours, the default) itself
        messages = [{"role": "user", "content": content}]
        ids = tokenizer.encode_chat(messages)
        mine = Engine(model, tokenizer).generate([ids], SamplingParams(max_tokens=NEW_TOKENS, temperature=0,
                                                                       stop_token_ids=(eos,)))[0]
        llm.reset()
        reply = llm.create_chat_completion(messages, max_tokens=NEW_TOKENS, temperature=0.0, top_k=1)
        assert reply["usage"]["prompt_tokens"] == len(ids)  # the same template, one BOS
        assert reply["usage"]["completion_tokens"] == len(mine.token_ids)
        # create_chat_completion drops the bytes of incomplete UTF-8 characters where we write U+FFFD
        assert reply["choices"][0]["message"]["content"] == mine.text.replace("\ufffd", "")
        assert greedy(capsys, root / "run", content, chat=True) == mine.text
