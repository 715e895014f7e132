"""`latentmoe serve` as a user runs it: a subprocess on 127.0.0.1 that answers the official client, drains on
SIGTERM (new requests 503, the request in flight finishes) and exits 0; bad arguments are one-line errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest

from latentmoe.cli import main

from .helpers import START_WAIT_S, WAIT_S, post, request, sse_events, wait_until

ROOT = Path(__file__).resolve().parents[2]


class ServeProcess:
    """``python -m latentmoe serve ...`` on a free port; the URL is read from its start-up line."""

    def __init__(self, *args):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "latentmoe", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.lines: list[str] = []
        self.url = None
        started = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                if "serving http://" in line:
                    self.url = line.split("serving ")[1].split("/v1")[0]
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        started.wait(START_WAIT_S)
        if self.url is None:
            self.stop()
            raise AssertionError("the server did not start: " + "".join(self.lines))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT_S)


@pytest.fixture
def serve(checkpoint):
    started = []

    def start(*args):
        started.append(ServeProcess("--checkpoint", str(checkpoint), "--dtype", "fp64", *args))
        return started[-1]

    yield start
    for s in started:
        s.stop()


@pytest.mark.slow
def test_sigterm_drains_the_request_in_flight_refuses_new_ones_and_exits_0(serve, checkpoint):
    server = serve("--no-speculative", "--shutdown-timeout", "120")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=WAIT_S)
    assert client.models.list().data[0].id == str(checkpoint)
    stream = client.completions.create(model=str(checkpoint), prompt="ROMEO:", max_tokens=600, temperature=0,
                                       stream=True)
    pieces = [next(iter(stream)).choices[0].text]  # it is running
    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: request(server.url, "GET", "/health")[0] == 503, "draining")
    status, _, body = post(server.url, "/v1/completions", {"model": str(checkpoint), "prompt": "x"})
    assert status == 503 and body["error"]["type"] == "service_unavailable"
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert server.proc.wait(WAIT_S) == 0
    assert any("draining" in line for line in server.lines) and "stopped" in server.lines[-1]
    assert len(pieces) + len(chunks) > 1


@pytest.mark.slow
def test_past_the_shutdown_timeout_the_stream_ends_with_an_error_event_and_the_server_exits_0(serve, checkpoint):
    server = serve("--no-speculative", "--shutdown-timeout", "0")
    body = {"model": str(checkpoint), "prompt": "ROMEO:", "max_tokens": 600, "temperature": 0, "stream": True}
    result = {}

    def read():
        result["events"] = sse_events(request(server.url, "POST", "/v1/completions", body)[2])

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: b"latentmoe_running_requests 1.0" in request(server.url, "GET", "/metrics")[2], "running")
    server.proc.send_signal(signal.SIGTERM)
    reader.join(WAIT_S)
    events = result["events"]
    assert events[-1] == "[DONE]" and "error" in events[-2]
    assert events[-2]["error"]["type"] == "service_unavailable"
    assert server.proc.wait(WAIT_S) == 0


def test_bad_arguments_are_one_line_errors(checkpoint, tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert main(["serve", "--checkpoint", str(checkpoint), "--prefill-workers", "2", "--port", "0"]) == 2
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        assert main(["serve", "--checkpoint", str(checkpoint), "--port", str(taken.getsockname()[1])]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 3 and all(line.startswith("latentmoe: error: ") for line in lines), err
    assert "--prefill-workers needs --disaggregate" in err and "cannot listen" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--checkpoint", str(checkpoint), "--port", "70000"])
    assert exit_info.value.code == 2


def test_the_command_serves_the_official_client_with_an_api_key(serve, checkpoint):
    server = serve("--api-key", "k3y", "--max-queued", "4", "--cache-dtype", "bf16")
    assert any("API key required" in line and "colocated" in line for line in server.lines)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="k3y", max_retries=0, timeout=WAIT_S)
    reply = client.chat.completions.create(model=str(checkpoint), messages=[{"role": "user", "content": "ROMEO:"}],
                                           max_tokens=4)
    assert reply.usage.completion_tokens <= 4 and reply.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert json.loads(request(server.url, "GET", "/health")[2])["status"] == "ok"
