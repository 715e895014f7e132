"""Serving under load: colocated vs prefill/decode-disaggregated ``latentmoe serve`` in the same run (issue 12).

    python benchmarks/serve.py                           # ~2 minutes: 20 s of load per mode
    python benchmarks/serve.py --duration 60 --rate 4 --checkpoint runs/demo

What it does. A checkpoint (default: the ``small`` preset with random weights and a tokenizer trained here on
the shipped corpus, in a temporary directory; or ``--checkpoint``) is served twice by the real command, as a
subprocess on 127.0.0.1 — once colocated, once with ``--disaggregate`` (1 prefill worker + 1 decode worker,
one torch thread each) — and both get the same load, generated from a fixed seed:

* Poisson arrivals at ``--rate`` requests/s for ``--duration`` seconds;
* mixed prompt lengths: most requests are short prompts (8-64 tokens, some 128-256) that decode 48-96 tokens
  — the "decoding" requests — and a fraction ``--long-fraction`` are long prompts (60-90 % of the context)
  that decode a few tokens — the prefill bursts;
* every request streams (``/v1/completions``, token-id prompts, greedy); each token's arrival time is taken
  on the client.

Reported per mode: output throughput (tokens/s over the load window), TTFT p50/p99 of the decoding
requests, and the inter-token latency p50/p99 of decoding requests over the gaps that overlapped a long
prompt's prefill (from its arrival to its first token) — the stall disaggregation is meant to remove —
and over all gaps. The goal (the paper's reason to split the stages): decode ITL p99 under prefill bursts
≥ 2x lower disaggregated, at equal throughput.

The peer. When ``llama_cpp`` (llama-cpp-python, an optional benchmark dependency built from source) and its
server extras are importable, the same checkpoint is exported with ``latentmoe convert CKPT OUT.gguf --to gguf``
(f32) and served by llama-cpp-python's OpenAI server (``python -m llama_cpp.server``, 2 threads, its default
f16 KV cache); it gets the same load. Its server runs one request at a time (no continuous batching; told not
to interrupt a running request when another arrives), so it is the baseline a single-stream engine gives.
Prompts are windows of the shipped corpus sent as text (the server takes no token ids), so every server
tokenises the same text with the same tokenizer; tokens are counted per streamed chunk (ours: the chunk's
logprobs tokens; llama.cpp: one token per chunk). Without the peer, the benchmark says so and reports
colocated vs disaggregated.

Honest limits. On 2 cores the disaggregated server has one core per worker while the colocated one uses both
for every step, and the front end shares them too; a prefill burst then still competes for the CPU with the
decode worker, so the separation is only as good as the cores are free. Absolute figures on a shared
machine are noise; rerun on a quiet one.

Writes benchmarks/results/serve.json (+ serve.png: ITL distributions under bursts).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SEED = 12
ITL_GOAL = 2.0
THROUGHPUT_TOLERANCE = 0.10  # "equal throughput": within 10 %
START_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 600
MS = 1000.0
CORPUS_FILES = ("romeo_and_juliet.txt", "hamlet.txt")
PEER_ABSENT = ("llama-cpp-python server: absent (pip install llama-cpp-python==0.3.36 sse-starlette "
               "starlette-context pydantic-settings; it compiles llama.cpp, several minutes)")
PEER_NAME = "llama-cpp-python {version} OpenAI server on our GGUF export (f32 weights, 2 threads)"


@dataclass
class Planned:
    at: float
    kind: str  # "decode" | "long"
    prompt: str
    max_tokens: int


@dataclass
class Trace:
    planned: Planned
    sent: float = 0.0
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (client time, tokens) of chunks with tokens
    tokens: int = 0
    error: str | None = None


def plan_load(*, seed: int, duration: float, rate: float, long_fraction: float, context: int,
              corpus_ids: list[int], decode) -> list[Planned]:
    """The arrival schedule, a pure function of its arguments: prompts are windows of ``corpus_ids`` (decoded)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            return out
        if rng.random() < long_fraction:
            n, max_tokens, kind = rng.randint(int(0.6 * context), int(0.9 * context)), 4, "long"
        else:
            n = rng.randint(128, 256) if rng.random() < 0.25 else rng.randint(8, 64)
            max_tokens, kind = rng.randint(48, 96), "decode"
        start = rng.randrange(0, len(corpus_ids) - n)
        out.append(Planned(t, kind, decode(corpus_ids[start:start + n]), max_tokens))


def send(url: str, model: str, trace: Trace, *, peer: bool = False) -> None:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=REQUEST_TIMEOUT_S)
    body = {"model": model, "prompt": trace.planned.prompt, "max_tokens": trace.planned.max_tokens,
            "temperature": 0, "stream": True}
    if not peer:
        body["logprobs"] = 0  # the tokens each of our chunks carries (a speculative chunk brings several)
    try:
        trace.sent = time.perf_counter()
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            trace.error = f"HTTP {response.status}"
            return
        while line := response.readline():
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            payload = json.loads(line[6:])
            if "error" in payload:
                trace.error = payload["error"]["message"]
                return
            if not payload.get("choices"):
                continue
            if peer:  # llama.cpp streams one token per chunk, then one that only carries the finish reason
                n = int(payload["choices"][0].get("finish_reason") is None)
            else:
                logprobs = payload["choices"][0].get("logprobs")
                n = len(logprobs["tokens"]) if logprobs else 0
            if n:
                trace.chunks.append((time.perf_counter(), n))
                trace.tokens += n
    except OSError as exc:
        trace.error = str(exc)
    finally:
        conn.close()


def run_load(url: str, model: str, schedule: list[Planned], *, peer: bool = False
             ) -> tuple[list[Trace], float, float]:
    traces = [Trace(p) for p in schedule]
    threads = []
    start = time.perf_counter()
    for trace in traces:
        delay = start + trace.planned.at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=send, args=(url, model, trace), kwargs={"peer": peer}, daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(REQUEST_TIMEOUT_S)
    return traces, start, time.perf_counter()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(traces: list[Trace], start: float, end: float) -> dict:
    ok = [t for t in traces if t.error is None]
    bursts = [(t.sent, t.chunks[0][0]) for t in ok if t.planned.kind == "long" and t.chunks]
    under, overall, ttft = [], [], []
    for t in ok:
        if t.planned.kind != "decode" or not t.chunks:
            continue
        ttft.append(t.chunks[0][0] - t.sent)
        for (a, _), (b, n) in zip(t.chunks, t.chunks[1:]):
            gaps = [(b - a) / n] * n  # a speculative or held-back chunk brings n tokens after one gap
            overall += gaps
            if any(s < b and a < e for s, e in bursts):
                under += gaps
    tokens = sum(t.tokens for t in ok)
    return {
        "requests": len(traces), "errors": len(traces) - len(ok), "long_prompts": len(bursts), "tokens": tokens,
        "seconds": end - start,
        "throughput_tokens_per_s": tokens / (end - start),
        "ttft_p50_ms": _ms(percentile(ttft, 50)), "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "itl_burst_p50_ms": _ms(percentile(under, 50)), "itl_burst_p99_ms": _ms(percentile(under, 99)),
        "itl_p50_ms": _ms(percentile(overall, 50)), "itl_p99_ms": _ms(percentile(overall, 99)),
        "itl_burst_samples": len(under), "_itl_burst_ms": [x * MS for x in under],
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else x * MS


class Server:
    """``latentmoe serve`` as a subprocess on a free port of 127.0.0.1."""

    def __init__(self, checkpoint: str, extra: list[str]):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-m", "latentmoe", "serve", "--checkpoint", checkpoint,
                                      "--port", "0", *extra], stderr=subprocess.PIPE, text=True, env=env)
        self.url, self.line = None, ""
        deadline = time.monotonic() + START_TIMEOUT_S
        for line in self.proc.stderr:
            if "serving http://" in line:
                self.line = line.strip()
                self.url = line.split("serving ")[1].split("/v1")[0]
                break
            if time.monotonic() > deadline:
                break
        if self.url is None:
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {line}")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class PeerServer(Server):
    """llama-cpp-python's OpenAI server on a GGUF file, as a subprocess on a free port of 127.0.0.1 (stopped as
    ``Server`` is)."""

    def __init__(self, gguf: Path, *, context: int, threads: int):
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
                                      "127.0.0.1", "--port", str(port), "--n_ctx", str(context), "--n_threads",
                                      str(threads), "--n_threads_batch", str(threads), "--logits_all", "false",
                                      "--interrupt_requests", "false"],  # queue, do not cut off, a running request
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    self.line = f"llama_cpp.server {gguf.name} on {self.url}"
                    return
            except OSError:
                time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError("llama_cpp.server did not start")



def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peer_version() -> str | None:
    """llama-cpp-python's version when it and its server extras are importable, else None."""
    try:
        import llama_cpp
        import llama_cpp.server.app  # noqa: F401  (the server extras: sse_starlette, starlette_context, ...)
    except ImportError:
        return None
    return llama_cpp.__version__


def export_gguf(checkpoint: str, out: Path) -> Path:
    """``latentmoe convert CHECKPOINT OUT.gguf --to gguf`` (f32) — the command a user runs."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "latentmoe", "convert", checkpoint, str(out), "--to", "gguf",
                    "--dtype", "f32"], check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def make_checkpoint(root: Path) -> str:
    import torch

    from latentmoe import CausalLM, ModelConfig
    from latentmoe.checkpoint import save_checkpoint
    from latentmoe.data.tokenizer import train_tokenizer

    root.mkdir()
    text = (REPO / "latentmoe/data/corpus/romeo_and_juliet.txt").read_text(encoding="utf-8")[:60_000]
    config = ModelConfig.from_preset("small")
    tokenizer = train_tokenizer(text, vocab_size=config.vocab_size)
    torch.manual_seed(SEED)
    save_checkpoint(root, 1, CausalLM(config), None, {}, config)
    tokenizer.save(str(root / "tokenizer.json"))
    return str(root)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from latentmoe.io import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, r in results.items():
        xs = sorted(r["_itl_burst_ms"])
        if xs:
            label = f"{mode} (p99 {r['itl_burst_p99_ms']:.0f} ms)"
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("inter-token latency of decoding requests during prefill bursts (ms)")
    ax.set_ylabel("fraction of gaps")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the small preset, random weights (built here)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per mode")
    ap.add_argument("--rate", type=float, default=3.0, help="requests per second (Poisson)")
    ap.add_argument("--long-fraction", type=float, default=0.15)
    ap.add_argument("--max-batch", type=int, default=16)
    args = ap.parse_args()

    version = peer_version()
    with tempfile.TemporaryDirectory(prefix="latentmoe-serve-bench-") as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "ckpt") if args.checkpoint is None else args.checkpoint
        from latentmoe.checkpoint import load_config, resolve_checkpoint
        from latentmoe.pretrained import load_tokenizer

        context = load_config(resolve_checkpoint(checkpoint)).max_position_embeddings
        tokenizer = load_tokenizer(checkpoint)
        corpus = "\n".join((REPO / "latentmoe/data/corpus" / name).read_text(encoding="utf-8")
                           for name in CORPUS_FILES)
        schedule = plan_load(seed=SEED, duration=args.duration, rate=args.rate, long_fraction=args.long_fraction,
                             context=context, corpus_ids=tokenizer.encode(corpus).ids, decode=tokenizer.decode)
        common = ["--no-speculative", "--max-batch", str(args.max_batch), "--max-queued", "1024",
                  "--cache-memory", "1GiB"]
        modes = {"colocated": common, "disaggregated": [*common, "--disaggregate", "--worker-threads", "1"]}
        if version is not None:
            modes["llama.cpp"] = None
        results, lines = {}, {}
        for mode, extra in modes.items():
            if extra is None:
                server = PeerServer(export_gguf(checkpoint, Path(tmp) / "model.gguf"), context=context,
                                    threads=os.cpu_count() or 1)
            else:
                server = Server(checkpoint, extra)
            try:
                run_load(server.url, checkpoint, schedule[:2], peer=extra is None)  # warm-up
                traces, start, end = run_load(server.url, checkpoint, schedule, peer=extra is None)
            finally:
                server.stop()
            results[mode] = summarize(traces, start, end)
            lines[mode] = server.line
            public = {k: v for k, v in results[mode].items() if not k.startswith("_")}
            print(f"{mode}: {json.dumps(public)}", flush=True)

    co, dis = results["colocated"], results["disaggregated"]
    ratio = co["itl_burst_p99_ms"] / dis["itl_burst_p99_ms"] if co["itl_burst_p99_ms"] and dis["itl_burst_p99_ms"] \
        else None
    throughput_ratio = dis["throughput_tokens_per_s"] / co["throughput_tokens_per_s"]
    equal = abs(throughput_ratio - 1) <= THROUGHPUT_TOLERANCE
    load = os.getloadavg()
    note = (f"load average at the end {load[0]:.1f} on {os.cpu_count()} cores (shared machine: timings are noise "
            f"unless it is quiet)" + ("" if version else f"; {PEER_ABSENT}"))
    peer_name = "colocated latentmoe serve, same load, same run"
    cases = [
        {"case": "decode ITL p99 during prefill bursts", "metric": "inter-token latency p99 ms (lower is better)",
         "ours": dis["itl_burst_p99_ms"], "peer": co["itl_burst_p99_ms"], "peer_name": peer_name, "ratio": ratio,
         "goal": f">= {ITL_GOAL:g}x at equal throughput", "met": bool(ratio and ratio >= ITL_GOAL and equal)},
        {"case": "decode ITL p50 during prefill bursts", "metric": "inter-token latency p50 ms (lower is better)",
         "ours": dis["itl_burst_p50_ms"], "peer": co["itl_burst_p50_ms"], "peer_name": peer_name,
         "ratio": _ratio(co["itl_burst_p50_ms"], dis["itl_burst_p50_ms"])},
        {"case": "output throughput", "metric": "tokens/s", "ours": dis["throughput_tokens_per_s"],
         "peer": co["throughput_tokens_per_s"], "peer_name": peer_name, "ratio": throughput_ratio,
         "goal": f"equal within {THROUGHPUT_TOLERANCE:.0%}", "met": equal},
        {"case": "TTFT p99 of decoding requests", "metric": "time to first token p99 ms (lower is better)",
         "ours": dis["ttft_p99_ms"], "peer": co["ttft_p99_ms"], "peer_name": peer_name,
         "ratio": _ratio(co["ttft_p99_ms"], dis["ttft_p99_ms"])},
        {"case": "TTFT p50 of decoding requests", "metric": "time to first token p50 ms (lower is better)",
         "ours": dis["ttft_p50_ms"], "peer": co["ttft_p50_ms"], "peer_name": peer_name,
         "ratio": _ratio(co["ttft_p50_ms"], dis["ttft_p50_ms"])},
    ]
    cases += peer_cases(results, version)
    for case in cases:
        case["note"] = note
    details = {m: {k: v for k, v in r.items() if not k.startswith("_")} | {"server": lines[m]}
               for m, r in results.items()}
    cases.append({"case": "details", "metric": "per mode", "ours": details["disaggregated"],
                  "peer": details["colocated"], "peer_name": peer_name, "ratio": None, "note": note})
    path = write_results("serve", cases)
    plot(results, RESULTS_DIR / "serve.png")
    print(f"ITL p99 under bursts: colocated {co['itl_burst_p99_ms']} ms, disaggregated {dis['itl_burst_p99_ms']} ms "
          f"-> {ratio if ratio is None else round(ratio, 2)}x; throughput ratio {throughput_ratio:.2f}; {note}")
    print(f"wrote {path}")
    return 0


def peer_cases(results: dict[str, dict], version: str | None) -> list[dict]:
    """Our colocated server against llama.cpp's on the same load (ratios: higher is better for us)."""
    if version is None:
        return [{"case": "llama-cpp-python OpenAI server", "metric": "n/a", "ours": None, "peer": None,
                 "peer_name": PEER_ABSENT, "ratio": None}]
    co, peer, name = results["colocated"], results["llama.cpp"], PEER_NAME.format(version=version)
    return [
        {"case": "output throughput vs llama.cpp server", "metric": "tokens/s", "ours": co["throughput_tokens_per_s"],
         "peer": peer["throughput_tokens_per_s"], "peer_name": name,
         "ratio": _ratio(co["throughput_tokens_per_s"], peer["throughput_tokens_per_s"])},
        {"case": "TTFT p50 vs llama.cpp server", "metric": "time to first token p50 ms (lower is better)",
         "ours": co["ttft_p50_ms"], "peer": peer["ttft_p50_ms"], "peer_name": name,
         "ratio": _ratio(peer["ttft_p50_ms"], co["ttft_p50_ms"])},
        {"case": "ITL p50 vs llama.cpp server", "metric": "inter-token latency p50 ms (lower is better)",
         "ours": co["itl_p50_ms"], "peer": peer["itl_p50_ms"], "peer_name": name,
         "ratio": _ratio(peer["itl_p50_ms"], co["itl_p50_ms"])},
        {"case": "errors", "metric": "failed requests", "ours": co["errors"], "peer": peer["errors"],
         "peer_name": name, "ratio": None},
    ]


def _ratio(peer: float | None, ours: float | None) -> float | None:
    return peer / ours if peer and ours else None


if __name__ == "__main__":
    sys.exit(main())
