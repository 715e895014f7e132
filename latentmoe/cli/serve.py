"""``latentmoe serve``: an OpenAI-compatible HTTP server for one of our checkpoints or a Hugging Face directory."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from latentmoe.cli.common import add_device_option, number, positive_int

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_QUEUED = 64
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
MAX_PORT = 65535
MAX_WORKERS = 64
API_KEY_ENV = "LATENTMOE_API_KEY"


def add_parser(sub) -> None:
    from latentmoe.cli.generate import memory_size

    p = sub.add_parser(
        "serve", help="serve a checkpoint over the OpenAI API (HTTP on 127.0.0.1)",
        description="Serve a checkpoint (a checkpoint-STEP dir, a run dir, or a Hugging Face DeepSeek-V3/V2 "
        "directory) with the OpenAI API: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics. "
        "SIGTERM or Ctrl-C drains: new requests get 503, requests in flight finish (up to --shutdown-timeout), "
        "then the server exits 0.")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory, run directory (newest checkpoint), or Hugging Face directory")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=number(0, MAX_PORT, integer=True), default=DEFAULT_PORT,
                   help="TCP port (default %(default)s; 0: any free port, printed at start-up)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: --checkpoint as given)")
    p.add_argument("--max-batch", type=positive_int(), default=DEFAULT_MAX_BATCH,
                   help="most requests decoded together (default %(default)s)")
    p.add_argument("--max-queued", type=positive_int(), default=DEFAULT_MAX_QUEUED,
                   help="most requests waiting for admission; past it new requests get 429 (default %(default)s)")
    p.add_argument("--max-model-len", type=positive_int(), default=None,
                   help="longest prompt + completion in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--cache-memory", type=memory_size, default=None,
                   help="cache pool budget, e.g. 2GiB (default: a quarter of the available memory, at most what "
                   "--max-batch sequences of --max-model-len can use)")
    p.add_argument("--cache-dtype", choices=("fp32", "bf16", "fp8"), default=None,
                   help="latent KV cache dtype (default: the model's)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp64"), default="fp32", help="weights and compute dtype")
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=None,
                   help="MTP speculative decoding (default: on when the checkpoint has an MTP module)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="decode and verify through the torch.compile'd static-shape step (first use of each batch/"
                        "cache bucket compiles, cached on disk by inductor; falls back to eager, saying why, where "
                        "compiling is unavailable) (default: --no-compile)")
    p.add_argument("--disaggregate", action="store_true",
                   help="prefill and decode in separate worker processes (torch.distributed; docs/disaggregation.md)")
    p.add_argument("--prefill-workers", type=number(1, MAX_WORKERS, integer=True), default=1,
                   help="prefill worker processes with --disaggregate (default %(default)s)")
    p.add_argument("--worker-threads", type=positive_int(1024), default=None,
                   help="torch threads per worker process with --disaggregate (default: cores / workers)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (or set {API_KEY_ENV}, which keeps the "
                   "key out of the process list)")
    p.add_argument("--shutdown-timeout", type=number(0, 24 * 3600), default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                   help="seconds to let requests in flight finish after SIGTERM (default %(default)s)")
    add_device_option(p)
    p.set_defaults(func=run)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else starts (a taken port is a one-line error)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    sock.listen()
    sock.set_inheritable(True)
    return sock


def build_backend(args: argparse.Namespace):
    from latentmoe.dtypes import dtype_from_name

    name = args.served_model_name or args.checkpoint
    if args.disaggregate:
        from latentmoe.pretrained import load_tokenizer
        from latentmoe.serve.disaggregated import DisaggregatedBackend, WorkerConfig

        tokenizer = load_tokenizer(args.checkpoint)  # a missing or bad checkpoint fails here, before any worker
        config = WorkerConfig(checkpoint=args.checkpoint, device=args.device, dtype=args.dtype,
                              cache_dtype=args.cache_dtype, max_batch=args.max_batch,
                              cache_memory_bytes=args.cache_memory, max_model_len=args.max_model_len,
                              num_threads=args.worker_threads)
        return DisaggregatedBackend(config, tokenizer=tokenizer, name=name, num_prefill=args.prefill_workers,
                                    max_queued=args.max_queued, speculative=args.speculative)
    from latentmoe.infer import Engine
    from latentmoe.pretrained import load
    from latentmoe.serve import LocalBackend

    model, tokenizer = load(args.checkpoint, device=args.device, dtype=dtype_from_name(args.dtype))
    speculative = len(model.mtp) > 0 if args.speculative is None else args.speculative
    engine = Engine(model, tokenizer, cache_dtype=args.cache_dtype, max_batch=args.max_batch,
                    cache_memory_bytes=args.cache_memory, max_model_len=args.max_model_len, compile=args.compile)
    return LocalBackend(engine, name=name, max_queued=args.max_queued, speculative=speculative)


def run(args: argparse.Namespace) -> int:
    from latentmoe.serve import DrainingServer, create_app
    from latentmoe.serve.server import uvicorn_config

    if args.prefill_workers != 1 and not args.disaggregate:
        raise ValueError("--prefill-workers needs --disaggregate")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    sock = bind(args.host, args.port)
    try:
        backend = build_backend(args)
    except BaseException:
        sock.close()
        raise
    try:
        app = create_app(backend, api_key=api_key)
        server = DrainingServer(uvicorn_config(app, host=args.host, port=args.port), state=app.state.server,
                                shutdown_timeout=args.shutdown_timeout)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"latentmoe: serving http://{shown}:{port}/v1 — {backend.info.describe()}"
              f"{', API key required' if api_key else ''}", file=sys.stderr, flush=True)
        server.run(sockets=[sock])
    finally:
        backend.close(abort=True)
        sock.close()
    print("latentmoe: stopped", file=sys.stderr, flush=True)
    return 0
