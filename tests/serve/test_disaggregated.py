"""Disaggregated serving: worker processes on torch.distributed (gloo), started by the server itself. Greedy
output equals colocated generation over many prompts, the bytes sent per request are prompt tokens × the
planner's cache bytes per token, and dead workers end their requests with 503 without hanging anything."""

import os
import random
import signal
import threading

import openai
import pytest
import torch

from latentmoe.infer import Engine, SamplingParams
from latentmoe.plan.arch import arch_from_model_config
from latentmoe.plan.arith import kv_bytes_per_token
from latentmoe.pretrained import load
from latentmoe.serve.disaggregated import DisaggregatedBackend, WorkerConfig
from latentmoe.serve.prompts import encode_chat

from .conftest import serving
from .helpers import WAIT_S, post, request, wait_until

pytestmark = pytest.mark.slow

CACHE_DTYPE = "fp32"


def start_backend(checkpoint, tokenizer, *, num_prefill):
    config = WorkerConfig(checkpoint=str(checkpoint), dtype="fp64", cache_dtype=CACHE_DTYPE, block_size=16,
                          max_batch=4, num_threads=1)
    return DisaggregatedBackend(config, tokenizer=tokenizer, name="tiny", num_prefill=num_prefill, max_queued=64)


@pytest.fixture(scope="module")
def disaggregated(checkpoint, tokenizer):
    backend = start_backend(checkpoint, tokenizer, num_prefill=2)
    with serving(backend) as server:
        yield server, backend


@pytest.fixture(scope="module")
def colocated_model(checkpoint):
    model, _ = load(checkpoint, dtype=torch.float64)
    return model


def test_disaggregated_greedy_output_equals_colocated_over_many_prompts(disaggregated, colocated_model, tokenizer):
    server, backend = disaggregated
    assert backend.info.speculative  # the checkpoint has an MTP module: drafts run in the decode worker
    rng = random.Random(0)
    prompts = [[0] + [rng.randrange(3, 512) for _ in range(n)] for n in (1, 5, 17, 40, 90, 200, 333, 7, 64, 2)]
    prompts += [[0, *tokenizer.encode(text).ids] for text in ("ROMEO:", "JULIET: O Romeo, Romeo!")]
    chat = [{"role": "user", "content": "ROMEO:"}]
    chat_ids = encode_chat(tokenizer, chat, bos_token_id=0, eos_token_id=1)  # the chat template's ids
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(1,))
    *expected, expected_chat = Engine(colocated_model, tokenizer, cache_dtype=CACHE_DTYPE, block_size=16,
                                      max_batch=4).generate([*prompts, chat_ids], params, speculative=True)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=WAIT_S)
    reply = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0, logprobs=0)
    for choice, ref in zip(reply.choices, expected, strict=True):
        assert choice.text == ref.text
        assert len(choice.logprobs.tokens) == len(ref.token_ids)
    streamed = client.chat.completions.create(model="tiny", messages=chat, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected_chat.text
    assert reply.usage.prompt_tokens == sum(map(len, prompts))


def test_seeded_sampling_continues_the_prefill_workers_random_stream(disaggregated, colocated_model, tokenizer):
    server, _ = disaggregated
    prompt = [0, *tokenizer.encode("ROMEO:").ids]
    ref = Engine(colocated_model, tokenizer, cache_dtype=CACHE_DTYPE, block_size=16).generate(
        [prompt], SamplingParams(max_tokens=10, temperature=1.0, seed=11, stop_token_ids=(1,)), speculative=True)[0]
    status, _, body = post(server.url, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 10,
                                                           "temperature": 1.0, "seed": 11})
    assert status == 200 and body["choices"][0]["text"] == ref.text


def test_transfer_bytes_are_prompt_tokens_times_the_planners_cache_bytes_per_token(disaggregated, colocated_model):
    server, backend = disaggregated
    config = colocated_model.config
    per_token = kv_bytes_per_token(arch_from_model_config(config, "tiny"), CACHE_DTYPE)
    assert backend.info.cache_bytes_per_token == per_token
    for prompt in ([0, 5, 6], [0] + list(range(3, 150))):
        before = backend.snapshot()
        status, _, body = post(server.url, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 2})
        assert status == 200 and body["usage"]["prompt_tokens"] == len(prompt)
        wait_until(lambda b=before: backend.snapshot().transfer_tokens > b.transfer_tokens, "the transfer counted")
        after = backend.snapshot()
        assert after.transfer_kv_bytes - before.transfer_kv_bytes == len(prompt) * per_token
        # the MTP module's input: the main model's hidden states, fp64
        assert after.transfer_hidden_bytes - before.transfer_hidden_bytes == len(prompt) * config.hidden_size * 8
    _, _, text = request(server.url, "GET", "/metrics")
    assert f'latentmoe_kv_transfer_bytes_total{{kind="kv"}} {float(backend.snapshot().transfer_kv_bytes)}' in \
        text.decode()


def test_the_front_end_refuses_what_the_decode_worker_could_never_run(disaggregated):
    server, backend = disaggregated
    limit = backend.info.max_model_len
    status, _, body = post(server.url, "/v1/completions", {"model": "tiny", "prompt": [0, 5], "max_tokens": limit})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, _, body = post(server.url, "/v1/completions", {"model": "tiny", "prompt": [0, 9999]})
    assert status == 400 and body["error"]["param"] == "prompt"


def test_dead_workers_end_their_requests_with_503_and_nothing_hangs(checkpoint, tokenizer):
    backend = start_backend(checkpoint, tokenizer, num_prefill=2)
    with serving(backend) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=WAIT_S)
        prefill_pid, _, decode_pid = backend.pids
        os.kill(prefill_pid, signal.SIGKILL)  # one prefill worker dies: the other one takes the prompts
        wait_until(lambda: backend.workers_alive == [False, True, True], "the front end noticing")
        for _ in range(3):
            assert client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=3).choices
        assert request(server.url, "GET", "/health")[0] == 200

        stream = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=3000, temperature=0, stream=True)
        next(iter(stream))  # decoding
        plain = {}
        waiter = threading.Thread(target=lambda: plain.update(r=post(server.url, "/v1/completions", {
            "model": "tiny", "prompt": "JULIET:", "max_tokens": 3000})))
        waiter.start()
        wait_until(lambda: backend.snapshot().num_running == 2, "both requests decoding")
        os.kill(decode_pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="decode worker"):
            list(stream)
        waiter.join(WAIT_S)
        status, _, body = plain["r"]
        assert status == 503 and "decode worker" in body["error"]["message"]
        with pytest.raises(openai.InternalServerError) as refused:
            client.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert refused.value.status_code == 503
        assert request(server.url, "GET", "/health")[0] == 503
        wait_until(lambda: not any(backend.processes_alive), "the other workers stopped")
