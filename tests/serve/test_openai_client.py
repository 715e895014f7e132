"""The server through the official ``openai`` client over real HTTP on 127.0.0.1: completions and chat,
streamed and not, usage, n, stop strings, seeds, logprobs and echo — greedy text equals Engine.generate."""

import math

import openai
import pytest
import torch

from latentmoe.infer import Engine, SamplingParams
from latentmoe.serve.prompts import encode_chat, encode_prompt, render_chat

from .conftest import local_backend, serving
from .helpers import metric, post, request

PROMPTS = ["ROMEO:", "JULIET: O Romeo, Romeo!", "Enter", "Good"]


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with serving(local_backend(model, tokenizer)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def engine_alone(model, tokenizer, prompt, max_tokens, **params):
    """What Engine.generate gives for the prompt, with the server's EOS stop."""
    sp = SamplingParams(max_tokens=max_tokens, stop_token_ids=(model.config.eos_token_id,), **params)
    return Engine(model, tokenizer, block_size=8).generate([prompt], sp)[0]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_engine_generate(client, model, tokenizer, prompt):
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    expected = engine_alone(model, tokenizer, prompt, 12, temperature=0)
    choice, = reply.choices
    assert choice.text == expected.text
    assert choice.finish_reason == ("stop" if expected.finish_reason == "stop" else "length")
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids) == len(tokenizer.encode(prompt).ids) + 1
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_completion_adds_up_to_the_unstreamed_one_and_reports_usage(client):
    whole = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_token_id_prompts_and_batches_of_prompts(client, model, tokenizer):
    ids = encode_prompt(tokenizer, "JULIET:", model.config.bos_token_id)
    reply = client.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=6, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice, prompt in zip(reply.choices, [ids, ids[:3]], strict=True):
        assert choice.text == Engine(model, tokenizer, block_size=8).generate(
            [prompt], SamplingParams(max_tokens=6, temperature=0, stop_token_ids=(1,)))[0].text
    assert reply.usage.prompt_tokens == len(ids) + 3


def test_chat_greedy_equals_engine_generate_on_the_rendered_template(client, model, tokenizer):
    messages = [{"role": "system", "content": "A play."}, {"role": "user", "content": "ROMEO:"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    specials = dict(bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id)
    # the one default template (latentmoe.hf.tokenizer), the same one train --sft renders with
    text = "<|bos|><|system|>\nA play.<|eos|><|user|>\nROMEO:<|eos|><|assistant|>\n"
    assert render_chat(tokenizer, messages, **specials) == text
    ids = encode_chat(tokenizer, messages, **specials)
    assert ids == tokenizer.encode(text, add_special_tokens=False).ids and ids.count(specials["bos_token_id"]) == 1
    expected = engine_alone(model, tokenizer, ids, 10, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_chat_stream_sends_the_role_first_and_ends_with_finish_reason_and_done(client, server):
    messages = [{"role": "user", "content": "ROMEO:"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=9, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=9, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    _, _, raw = request(server.url, "POST", "/v1/chat/completions",
                        {"model": "tiny", "messages": messages, "max_tokens": 2, "stream": True})
    assert raw.decode().rstrip().endswith("data: [DONE]")


def test_n_choices_with_a_seed_differ_from_each_other_and_repeat_exactly(client, tokenizer):
    kwargs = dict(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=1.0, n=2, seed=7)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text
    assert first.usage.prompt_tokens == len(tokenizer.encode("ROMEO:").ids) + 1  # counted once for both choices
    assert first.usage.completion_tokens == sum(len(tokenizer.encode(c.text).ids) > 0 and 12 for c in first.choices)
    other = client.completions.create(**{**kwargs, "seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    chat = dict(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=8, temperature=1.0, seed=3)
    assert client.chat.completions.create(**chat).choices[0].message.content == \
        client.chat.completions.create(**chat).choices[0].message.content


def test_stop_string_cuts_the_text_before_it(client):
    whole = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0).choices[0].text
    stop = whole[5:7]
    assert stop and whole.find(stop) >= 0
    cut = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == whole[: whole.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def reference_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]), compute_mtp=False).logits[0].double(), dim=-1)


def test_echo_with_logprobs_scores_the_prompt_and_the_completion(client, model, tokenizer):
    """What evaluation harnesses do for log-likelihoods: echo=True, logprobs=N; checked against a full
    forward over prompt + completion computed here."""
    prompt = "JULIET: O Romeo"
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2)
    choice = reply.choices[0]
    prompt_ids = encode_prompt(tokenizer, prompt, model.config.bos_token_id)
    lp = choice.logprobs
    assert choice.text.startswith(prompt)
    assert len(lp.tokens) == len(prompt_ids) + 4 and lp.token_logprobs[0] is None
    out_ids = engine_alone(model, tokenizer, prompt, 4, temperature=0).token_ids
    ref = reference_logprobs(model, prompt_ids + out_ids)
    full = prompt_ids + out_ids
    for i in range(1, len(full)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, full[i]]), abs=1e-6)
        assert lp.tokens[i] in lp.top_logprobs[i]
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-6)
    assert lp.text_offset[1] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert math.isclose(sum(lp.token_logprobs[1:]), float(sum(ref[i - 1, full[i]] for i in range(1, len(full)))),
                        abs_tol=1e-5)


def test_streamed_echo_sends_the_prompt_first(client):
    chunks = list(client.completions.create(model="tiny", prompt="Enter", max_tokens=3, temperature=0, echo=True,
                                            stream=True))
    assert chunks[0].choices[0].text == "Enter"
    whole = client.completions.create(model="tiny", prompt="Enter", max_tokens=3, temperature=0, echo=True)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_chat_logprobs_give_each_token_and_its_alternatives(client, model, tokenizer):
    messages = [{"role": "user", "content": "ROMEO:"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 5
    prompt_ids = encode_chat(tokenizer, messages, bos_token_id=model.config.bos_token_id,
                             eos_token_id=model.config.eos_token_id)
    out_ids = engine_alone(model, tokenizer, prompt_ids, 5, temperature=0).token_ids
    ref = reference_logprobs(model, prompt_ids + out_ids)
    for j, entry in enumerate(content):
        row = ref[len(prompt_ids) - 1 + j]
        assert entry.logprob == pytest.approx(float(row[out_ids[j]]), abs=1e-6)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-6)
        assert entry.bytes == list(entry.token.encode("utf-8"))


def test_models_health_and_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    status, _, body = request(server.url, "GET", "/health")
    assert status == 200 and b"ok" in body
    before = metric(server.url, "latentmoe_requests_total", endpoint="/v1/completions", status="200")
    client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0)
    assert metric(server.url, "latentmoe_requests_total", endpoint="/v1/completions", status="200") == before + 1
    assert metric(server.url, "latentmoe_cache_blocks", state="free") > 0
    assert metric(server.url, "latentmoe_healthy") == 1
    assert metric(server.url, "latentmoe_time_to_first_token_seconds_count") >= 1


def test_health_is_503_while_loading_and_while_draining(model, tokenizer):
    from latentmoe.serve import BackgroundServer, create_app

    app = create_app(None)
    with BackgroundServer(app) as s:
        assert request(s.url, "GET", "/health")[0] == 503
        status, _, body = post(s.url, "/v1/completions", {"model": "tiny", "prompt": "x"})
        assert status == 503 and body["error"]["type"] == "service_unavailable"
        backend = local_backend(model, tokenizer)
        app.state.server.backend = backend  # loaded
        assert request(s.url, "GET", "/health")[0] == 200
        app.state.server.start_draining()
        assert request(s.url, "GET", "/health")[0] == 503
        assert post(s.url, "/v1/completions", {"model": "tiny", "prompt": "x"})[0] == 503
        backend.close()


def test_api_key_is_required_on_v1_routes_only(model, tokenizer):
    with serving(local_backend(model, tokenizer), api_key="s3cret") as s:
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="x", max_tokens=2).choices
        for key in ("wrong", "s3cre", "s3cretX"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0).models.list()
        status, _, body = post(s.url, "/v1/completions", {"model": "tiny", "prompt": "x"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert request(s.url, "GET", "/health")[0] == 200 and request(s.url, "GET", "/metrics")[0] == 200
        assert metric(s.url, "latentmoe_requests_total", endpoint="/v1/completions", status="401") == 1


def test_a_hugging_face_directory_is_served_with_its_own_chat_template(tmp_path, model, tokenizer):
    """The checkpoint's tokenizer_config.json template (here one that writes roles and the BOS token itself)
    renders the chat, and the BOS it writes is not doubled."""
    from latentmoe.hf import HFTokenizer, save_pretrained
    from latentmoe.pretrained import load

    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    hf_tokenizer = HFTokenizer(tokenizer, chat_template=template, special_tokens={"bos_token": "<|bos|>"})
    save_pretrained(model, tmp_path / "hf", tokenizer=hf_tokenizer)
    loaded, loaded_tokenizer = load(tmp_path / "hf", dtype=torch.float64)
    messages = [{"role": "user", "content": "ROMEO:"}]
    text = "<|bos|>[user] ROMEO:\n[assistant]"
    assert render_chat(loaded_tokenizer, messages) == text
    ids = encode_prompt(loaded_tokenizer, text, loaded.config.bos_token_id)
    assert ids.count(loaded.config.bos_token_id) == 1 and ids[0] == loaded.config.bos_token_id
    expected = Engine(loaded, loaded_tokenizer, block_size=8).generate(
        [ids], SamplingParams(max_tokens=6, temperature=0, stop_token_ids=(1,)))[0]
    with serving(local_backend(loaded, loaded_tokenizer, name="hf")) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
        reply = client.chat.completions.create(model="hf", messages=messages, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(ids)
