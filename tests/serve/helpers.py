"""Raw HTTP for the server tests (the official client is used wherever it can express the request)."""

import http.client
import json
import time
from urllib.parse import urlparse

from prometheus_client.parser import text_string_to_metric_families

WAIT_S = 120  # bound on every wait for the server to reach a state (generous: the machine may be busy)
START_WAIT_S = 240  # for a server process to start (imports torch, loads the checkpoint)


def request(url, method, path, body=b"", headers=None, timeout=WAIT_S):
    """(status, headers, body bytes) of one HTTP request."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def post(url, path, body, headers=None):
    status, hdrs, data = request(url, "POST", path, body, headers)
    return status, hdrs, json.loads(data) if data else None


def metrics(url) -> dict:
    """{(name, labels as sorted tuple): value} of /metrics."""
    _, _, data = request(url, "GET", "/metrics")
    out = {}
    for family in text_string_to_metric_families(data.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(url, name, **labels) -> float:
    return metrics(url).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(predicate, what, timeout=WAIT_S, poll=0.01):
    """Wait for ``predicate()`` to hold (ordering between threads, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def assert_openai_error(body, status):
    assert 400 <= status < 500, (status, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str) and error["message"]


def sse_events(raw: bytes) -> list:
    """The data payloads of an SSE body: parsed JSON, and the string "[DONE]"."""
    out = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
