"""Serving: an OpenAI-compatible HTTP server on the engine, colocated or with prefill/decode disaggregation.

    latentmoe serve --checkpoint runs/demo                 # http://127.0.0.1:8000/v1, the OpenAI API
    latentmoe serve --checkpoint runs/demo --disaggregate  # prefill and decode in worker processes

Layout: protocol.py (the API's pydantic models and error shape), prompts.py (chat templates, BOS, token
texts), backend.py (what the HTTP layer talks to; the colocated LocalBackend), app.py (FastAPI routes, SSE,
admission, disconnects, API key), metrics.py (Prometheus), server.py (uvicorn with graceful drain, or in a
background thread), disaggregated.py + transfer.py (worker processes on torch.distributed; docs/disaggregation.md).

In a program:

    from latentmoe.serve import BackgroundServer, LocalBackend, create_app
    backend = LocalBackend(Engine(model, tokenizer), name="tiny", max_queued=64)
    with BackgroundServer(create_app(backend)) as server:
        ...  # openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    backend.close()
"""

from latentmoe.serve.app import create_app
from latentmoe.serve.backend import BackendSnapshot, LocalBackend, ModelInfo
from latentmoe.serve.server import BackgroundServer, DrainingServer

__all__ = ["BackendSnapshot", "BackgroundServer", "DrainingServer", "LocalBackend", "ModelInfo", "create_app"]
