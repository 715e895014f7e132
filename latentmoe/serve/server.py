"""Running the app on uvicorn: in the foreground with graceful drain (the CLI), or in a background thread
(tests, benchmarks, embedding a server in a program).

Drain. uvicorn alone stops accepting connections at SIGTERM and closes them; this server instead keeps
listening and answers 503 to new requests while the accepted ones finish: the first SIGTERM / SIGINT marks
the server draining (``/health`` 503, new requests 503), waits up to ``shutdown_timeout`` seconds for the
backend's requests to end, cancels what is left (their streams get an error event), then lets uvicorn close
the connections and return — the process exits 0. A second signal cuts the wait short.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from latentmoe.serve.app import ServerState

log = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
CLOSE_GRACE_S = 5  # for uvicorn to finish writing responses after the engine is done
STARTUP_TIMEOUT_S = 60.0
POLL_S = 0.01


def uvicorn_config(app, *, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
    # h11 and the asyncio loop: the pure-Python stack, the same on every machine
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http="h11", loop="asyncio",
                          lifespan="off", timeout_graceful_shutdown=CLOSE_GRACE_S, access_log=False)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first signal drains the backend before uvicorn's own shutdown (module docstring)."""

    def __init__(self, config: uvicorn.Config, *, state: ServerState, shutdown_timeout: float):
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self._drainer: threading.Thread | None = None

    def handle_exit(self, sig, frame) -> None:  # called in the main thread, as a signal handler
        if self._drainer is None:
            log.info("draining: new requests get 503; waiting up to %gs for %s", self.shutdown_timeout,
                     "the requests in flight")
            self.state.start_draining()
            self._drainer = threading.Thread(target=self._drain, name="latentmoe-drain", daemon=True)
            self._drainer.start()
        else:  # a second signal: stop waiting
            log.info("second signal: cancelling the requests in flight")
            if self.state.backend is not None:
                threading.Thread(target=self.state.backend.close, kwargs={"abort": True}, daemon=True).start()
            self.should_exit = True

    def _drain(self) -> None:
        backend = self.state.backend
        if backend is not None and not backend.drain(self.shutdown_timeout):
            log.warning("shutdown timeout (%gs): cancelling the requests still running", self.shutdown_timeout)
            backend.close(abort=True)
        self.should_exit = True

    @property
    def port(self) -> int:
        return self.servers[0].sockets[0].getsockname()[1]


class BackgroundServer:
    """The app on 127.0.0.1 (port 0: a free one) in a daemon thread; ``with BackgroundServer(app) as s:``
    gives ``s.url``; leaving the block stops uvicorn (the backend is the caller's to close)."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0):
        self.server = uvicorn.Server(uvicorn_config(app, host=host, port=port))
        self._thread = threading.Thread(target=self.server.run, name="latentmoe-http", daemon=True)

    def start(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(POLL_S)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(STARTUP_TIMEOUT_S)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
