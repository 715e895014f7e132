"""Malformed requests: each is a 4xx in the OpenAI error shape naming what is wrong — never a 500, never a
crashed engine — and the server answers a good request afterwards."""

import json

import pytest

from .conftest import local_backend, serving
from .helpers import assert_openai_error, post, request

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
GOOD = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 2}
CHAT_GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "ROMEO:"}], "max_tokens": 2}
BLOCK_SIZE = 8
NUM_BLOCKS = 40  # 320 cache positions, under the model's 512: a request can fit the context but not the pool


def completion(**fields):
    return json.dumps({**GOOD, **fields}).encode()


def chat(**fields):
    return json.dumps({**CHAT_GOOD, **fields}).encode()


def without(body: dict, key: str) -> bytes:
    return json.dumps({k: v for k, v in body.items() if k != key}).encode()


# (name, path, raw body, expected status, the param the error names or None)
CASES = [
    ("truncated JSON", COMPLETIONS, b'{"model": "tiny", "prompt":', 400, None),
    ("not JSON", COMPLETIONS, b"prompt=ROMEO", 400, None),
    ("empty body", COMPLETIONS, b"", 400, None),
    ("a JSON list", COMPLETIONS, b"[]", 400, None),
    ("JSON null", COMPLETIONS, b"null", 400, None),
    ("non-UTF-8 bytes", COMPLETIONS, b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, None),
    ("missing model", COMPLETIONS, without(GOOD, "model"), 400, "model"),
    ("unknown model", COMPLETIONS, completion(model="gpt-4"), 404, "model"),
    ("missing prompt", COMPLETIONS, without(GOOD, "prompt"), 400, "prompt"),
    ("empty prompt", COMPLETIONS, completion(prompt=""), 400, "prompt"),
    ("empty prompt list", COMPLETIONS, completion(prompt=[]), 400, "prompt"),
    ("prompt of mixed types", COMPLETIONS, completion(prompt=[1, "a"]), 400, "prompt"),
    ("prompt as a number", COMPLETIONS, completion(prompt=5), 400, "prompt"),
    ("token id past the vocabulary", COMPLETIONS, completion(prompt=[0, 99999]), 400, "prompt"),
    ("negative token id", COMPLETIONS, completion(prompt=[-1]), 400, "prompt"),
    ("max_tokens 0", COMPLETIONS, completion(max_tokens=0), 400, "max_tokens"),
    ("negative max_tokens", COMPLETIONS, completion(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens as a string", COMPLETIONS, completion(max_tokens="10"), 400, "max_tokens"),
    ("fractional max_tokens", COMPLETIONS, completion(max_tokens=2.5), 400, "max_tokens"),
    ("huge max_tokens", COMPLETIONS, completion(max_tokens=10**30), 400, "max_tokens"),
    ("max_tokens past the context", COMPLETIONS, completion(max_tokens=600), 400, "max_tokens"),
    ("more than the cache pool", COMPLETIONS, completion(max_tokens=400), 400, "max_tokens"),
    ("negative temperature", COMPLETIONS, completion(temperature=-1), 400, "temperature"),
    ("temperature as text", COMPLETIONS, completion(temperature="hot"), 400, "temperature"),
    ("infinite temperature", COMPLETIONS, completion(temperature=1e999), 400, None),
    ("NaN top_p", COMPLETIONS, b'{"model": "tiny", "prompt": "x", "top_p": NaN}', 400, None),
    ("top_p 0", COMPLETIONS, completion(top_p=0), 400, "top_p"),
    ("top_p above 1", COMPLETIONS, completion(top_p=1.5), 400, "top_p"),
    ("n 0", COMPLETIONS, completion(n=0), 400, "n"),
    ("negative n", COMPLETIONS, completion(n=-1), 400, "n"),
    ("n far too large", COMPLETIONS, completion(n=1000), 400, "n"),
    ("stream as a string", COMPLETIONS, completion(stream="yes"), 400, "stream"),
    ("empty stop string", COMPLETIONS, completion(stop=[""]), 400, "stop"),
    ("stop as a number", COMPLETIONS, completion(stop=123), 400, "stop"),
    ("logprobs above 20", COMPLETIONS, completion(logprobs=100), 400, "logprobs"),
    ("negative seed", COMPLETIONS, completion(seed=-3), 400, "seed"),
    ("an unknown field", COMPLETIONS, completion(foo=1), 400, "foo"),
    ("a penalty it does not implement", COMPLETIONS, completion(presence_penalty=0.5), 400, "presence_penalty"),
    ("stream_options without stream", COMPLETIONS, completion(stream_options={"include_usage": True}), 400, None),
    ("a prompt of one megabyte", COMPLETIONS, completion(prompt="ROMEO " * 170_000), 400, "prompt"),
    ("chat: no messages", CHAT, chat(messages=[]), 400, "messages"),
    ("chat: messages not a list", CHAT, chat(messages="hello"), 400, "messages"),
    ("chat: unknown role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role"),
    ("chat: content as a number", CHAT, chat(messages=[{"role": "user", "content": 7}]), 400, "messages.0.content"),
    ("chat: an image part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "x"}}]}]), 400, "messages.0.content"),
    ("chat: top_logprobs without logprobs", CHAT, chat(top_logprobs=2), 400, None),
    ("chat: max_completion_tokens 0", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("chat: a conversation past the context", CHAT, chat(messages=[{"role": "user", "content": "ROMEO " * 600}]),
     400, "messages"),
    ("chat: tools", CHAT, chat(tools=[{"type": "function"}]), 400, "tools"),
    ("chat: missing model", CHAT, without(CHAT_GOOD, "model"), 400, "model"),
]


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with serving(local_backend(model, tokenizer, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS)) as s:
        yield s


def test_the_table_has_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "path", "body", "status", "param"), CASES, ids=[c[0] for c in CASES])
def test_malformed_request_is_a_4xx_in_the_openai_error_shape(server, name, path, body, status, param):
    got, _, raw = request(server.url, "POST", path, body)
    error = json.loads(raw)
    assert got == status, error
    assert_openai_error(error, got)
    if param is not None:
        assert error["error"]["param"] == param, error
    assert post(server.url, path, GOOD if path == COMPLETIONS else CHAT_GOOD)[0] == 200  # still serving


def test_oversized_bodies_unknown_routes_and_methods(server):
    status, _, raw = request(server.url, "POST", COMPLETIONS, b"x" * (9 * 2**20))
    assert status == 413
    assert_openai_error(json.loads(raw), status)
    for method, path, expected in (("GET", "/v1/nothing", 404), ("GET", COMPLETIONS, 405), ("DELETE", "/health", 405)):
        status, _, raw = request(server.url, method, path)
        assert status == expected
        assert_openai_error(json.loads(raw), status)
    assert request(server.url, "GET", "/health")[0] == 200
