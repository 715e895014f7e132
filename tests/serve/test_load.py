"""The server under load: 16 concurrent streaming clients each get what they get alone; a full waiting queue
answers 429 and breaks nothing; a client that disconnects frees its blocks. Ordering is controlled with a
gate on the decode step (conftest.Gate), never with sleeps."""

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import openai
import pytest

from latentmoe.infer import Engine, SamplingParams
from latentmoe.serve.prompts import encode_chat

from .conftest import Gate, local_backend, serving
from .helpers import WAIT_S, assert_openai_error, metric, post, wait_until

CLIENTS = 16


def test_sixteen_concurrent_streams_each_get_what_they_get_alone(model, tokenizer):
    prompts = [f"ROMEO: {'O ' * (i % 5)}speak {i}" for i in range(CLIENTS)]
    max_tokens = [4 + (i * 7) % 13 for i in range(CLIENTS)]
    # odd clients ask for a completion of the text, even ones chat with it (the chat template's ids)
    asked = [p if i % 2 else encode_chat(tokenizer, [{"role": "user", "content": p}], bos_token_id=0, eos_token_id=1)
             for i, p in enumerate(prompts)]
    alone = [Engine(model, tokenizer, block_size=8).generate(
        [p], SamplingParams(max_tokens=m, temperature=0, stop_token_ids=(1,)))[0] for p, m in zip(asked, max_tokens)]
    gate = Gate()  # the first step waits until all 16 are queued: then 6 run and 10 wait, whatever the timing
    backend = local_backend(model, tokenizer, max_batch=6, max_queued=CLIENTS, runner_cls=gate.runner_cls)
    with serving(backend) as server, gate:
        start = threading.Barrier(CLIENTS, timeout=WAIT_S)

        def stream(i):
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=WAIT_S)
            start.wait()
            if i % 2:
                chunks = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=max_tokens[i],
                                                   temperature=0, stream=True)
                return "".join(c.choices[0].text for c in chunks)
            chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompts[i]}],
                                                    max_tokens=max_tokens[i], temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks)

        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(stream, i) for i in range(CLIENTS)]
            wait_until(lambda: backend.snapshot().num_waiting == CLIENTS, "all clients queued")  # (see Gate)
            gate.open.set()
            texts = [f.result(2 * WAIT_S) for f in futures]
        assert texts == [r.text for r in alone]
        assert backend.async_engine.snapshot().stats.max_running == 6
        counted = sum(metric(server.url, "latentmoe_requests_total", endpoint=e, status="200")
                      for e in ("/v1/completions", "/v1/chat/completions"))
        assert counted == CLIENTS
        assert metric(server.url, "latentmoe_time_to_first_token_seconds_count") == CLIENTS
        assert metric(server.url, "latentmoe_generation_tokens_total") == sum(len(r.token_ids) for r in alone)
        assert metric(server.url, "latentmoe_cache_blocks", state="used") == 0


def test_a_full_queue_answers_429_and_nothing_else_breaks(model, tokenizer):
    gate = Gate(hold_from_step=2)  # the slow request's first step is over: it counts as running, not waiting
    backend = local_backend(model, tokenizer, max_batch=1, max_queued=2, speculative=False,
                            runner_cls=gate.runner_cls)
    with serving(backend) as server, gate:
        body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 30, "temperature": 0}
        with ThreadPoolExecutor(3) as pool:
            slow = pool.submit(post, server.url, "/v1/completions", body)
            assert gate.entered.wait(WAIT_S)  # the slow request runs, its second decode step held at the gate
            queued = [pool.submit(post, server.url, "/v1/completions", {**body, "max_tokens": 3}) for _ in range(2)]
            wait_until(lambda: backend.snapshot().num_waiting == 2, "two requests queued")
            refused = [post(server.url, "/v1/completions", body) for _ in range(3)]
            refused.append(post(server.url, "/v1/chat/completions",
                                {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}))
            for status, headers, error in refused:
                assert status == 429 and headers["retry-after"] == "1"
                assert_openai_error(error, status) and error["error"]["code"] == "rate_limit_exceeded"
            gate.open.set()
            assert slow.result(WAIT_S)[0] == 200 and slow.result()[2]["usage"]["completion_tokens"] == 30
            assert [f.result(WAIT_S)[0] for f in queued] == [200, 200]
        snap = backend.snapshot()
        assert snap.free_blocks == snap.num_blocks and snap.num_waiting == snap.num_running == 0
        assert metric(server.url, "latentmoe_requests_total", endpoint="/v1/completions", status="429") == 3
        assert post(server.url, "/v1/completions", body)[0] == 200  # and it serves on


def open_stream(url, body):
    """Start a streamed request and return the connection once the response headers arrived."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=WAIT_S)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_cancels_its_request_and_frees_its_blocks(model, tokenizer, stream):
    gate = Gate(hold_from_step=2)  # so that the snapshot read below is of a step with the request running
    backend = local_backend(model, tokenizer, max_batch=2, speculative=False, runner_cls=gate.runner_cls)
    with serving(backend) as server, gate:
        body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 200, "temperature": 0, "stream": stream}
        u = urlparse(server.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=WAIT_S)
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        if stream:
            assert conn.getresponse().status == 200  # headers of the stream: the request was admitted
        assert gate.entered.wait(WAIT_S)  # it holds blocks and sits in a decode step
        assert backend.snapshot().used_blocks > 0
        conn.sock.shutdown(2)
        conn.close()
        wait_until(lambda: metric(server.url, "latentmoe_client_disconnects_total") == 1, "the server noticing")
        gate.open.set()
        wait_until(lambda: backend.snapshot().free_blocks == backend.snapshot().num_blocks, "the blocks freed")
        stats = backend.async_engine.snapshot().stats
        assert stats.aborted_requests == 1 and stats.finished_requests == 0  # cancelled, not run to the end
        reply = post(server.url, "/v1/completions", {**body, "stream": False, "max_tokens": 2})
        assert reply[0] == 200
