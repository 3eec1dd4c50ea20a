"""Throughput and latency of `mistral-ref serve` under concurrent clients: continuous batching against a server that
serves one request at a time (the same server with --max-batch 1), in the same run; then memory over a soak.

    .venv/bin/python benchmarks/bench_server.py [--models embedded,mistral-125m] [--clients 1,8,32]
                                                [--requests-per-client 4] [--max-tokens 64] [--prompt-words 60]
                                                [--soak 2000] [--threads 1] [--json out.json]

For each model (the embedded tiny Mixtral; a random-weight Mistral-shaped ~125M model with the 32k SentencePiece
vocabulary of mistral-common's v3 tokenizer, written as a checkpoint in a temporary directory) and each mode
(--max-batch 32, --max-batch 1), the script starts `python -m mistral_ref serve` in a subprocess on 127.0.0.1
and, from threads of this process, runs each concurrency level: C clients, each sending --requests-per-client
non-streaming requests back to back (greedy, ignore_eos, exactly --max-tokens tokens each, prompts of 5 to
--prompt-words words drawn with a fixed seed: a chat-like mix of short prompts and longer replies; prompt-heavy
mixes gain less, since prefill is compute-bound already at batch 1).  Per level: aggregate tokens/s (completion
tokens of all requests / wall time), p50, p95 and max request latency (the max shows whether any request starved).
The speedup column is batched aggregate tokens/s over one-at-a-time.

Soak (--soak N, batched server, embedded model): N mixed requests from 32 clients (streaming or not, 1..48
tokens, greedy or seeded sampling, stop strings, JSON mode, 5% of streaming clients hang up after the first
chunk); the server's resident memory (VmRSS) is read every N/10 requests, and /health must show an idle server
with its KV cache released at the end.

A benchmark, not a test: nothing here asserts a speed.  The machine may be shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the cat sat on a mat while river light moved over old stone bridges and quiet towns where people "
         "talk about weather books music trains markets gardens history science and small daily things").split()


# ---- the server ----------------------------------------------------------------------------------------------
def mistral_125m_checkpoint(directory: Path) -> Path:
    """A random-weight ~125M Mistral-shaped checkpoint (benchmarks/bench.py's shape) with mistral-common's v3
    SentencePiece tokenizer (32768 tokens)."""
    import shutil

    import torch

    from mistral_ref.checkpoint import save_checkpoint
    from mistral_ref.config import ModelArgs
    from mistral_ref.model import Transformer
    from mistral_ref.tokenizer import mistral_common_data_dir

    data = mistral_common_data_dir()
    if data is None:
        raise SystemExit("the mistral-125m model needs mistral-common's tokenizer files (pip install mistral-common)")
    tokenizer = data / "mistral_instruct_tokenizer_240323.model.v3"
    torch.manual_seed(0)
    args = ModelArgs(dim=768, n_layers=12, hidden_dim=2048, n_heads=12, n_kv_heads=4, head_dim=64,
                     vocab_size=32768, norm_eps=1e-5, rope_theta=1e6, max_seq_len=4096)
    save_checkpoint(Transformer(args), directory)
    shutil.copy(tokenizer, directory / "tokenizer.model.v3")
    return directory


class Server:
    """`python -m mistral_ref serve` in a subprocess, on a free port of 127.0.0.1."""

    def __init__(self, checkpoint: Path | None, max_batch: int, threads: int):
        command = [sys.executable, "-m", "mistral_ref", "serve", *([str(checkpoint)] if checkpoint else []),
                   "--port", "0", "--model-name", "bench", "--max-batch", str(max_batch), "--threads", str(threads),
                   "--max-queue", "4096", "--max-connections", "1024"]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("MISTRAL_REF_API_KEY", None)
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        line = self.proc.stdout.readline()
        if " on http://" not in line:
            raise SystemExit(f"the server did not start: {line!r}")
        self.host, port = line.split(" on http://")[1].split()[0].split(":")
        self.port = int(port)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def get(self, path: str) -> dict:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        conn.request("GET", path)
        out = json.loads(conn.getresponse().read())
        conn.close()
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


# ---- clients -------------------------------------------------------------------------------------------------
def prompt(rng: random.Random, words: int = 60) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, words)))


def send(server: Server, body: dict, hang_up: bool = False) -> tuple[float, int]:
    """One request: (seconds to the whole response, completion tokens); streaming responses are read to the end
    (or, with hang_up, closed after the first chunk)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    tokens = 0
    if body.get("stream"):
        if hang_up:
            resp.fp.readline()
            conn.sock.close()
            return time.perf_counter() - t0, 0
        events = [e[6:] for e in resp.read().decode().split("\n\n") if e.startswith("data: ")]
        last = json.loads(events[-2])
        tokens = last["usage"]["completion_tokens"]
    else:
        tokens = json.loads(resp.read())["usage"]["completion_tokens"]
    conn.close()
    return time.perf_counter() - t0, tokens


def level(server: Server, clients: int, per_client: int, max_tokens: int, seed: int, words: int = 60) -> dict:
    """C clients each sending per_client requests back to back; aggregate tokens/s and latency percentiles."""
    rng = random.Random(seed)
    bodies = [[{"messages": [{"role": "user", "content": prompt(rng, words)}], "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True} for _ in range(per_client)] for _ in range(clients)]

    def client(mine: list[dict]) -> list[tuple[float, int]]:
        return [send(server, body) for body in mine]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, bodies) for r in rs]
    wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": sum(r[1] for r in results),
            "tok_s": sum(r[1] for r in results) / wall, "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))], "max": latencies[-1]}


def soak(server: Server, n: int, clients: int = 32, seed: int = 1) -> list[tuple[int, float]]:
    """n mixed requests from `clients` threads; (requests done, server RSS MiB) every n/10 requests."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        body = {"messages": [{"role": "user", "content": prompt(rng)}], "max_tokens": rng.randint(1, 48),
                "stream": rng.random() < 0.5}
        if rng.random() < 0.5:
            body.update(temperature=0.7, seed=i)
        else:
            body["temperature"] = 0
        if rng.random() < 0.1:
            body["stop"] = [rng.choice(WORDS), "."]
        if rng.random() < 0.1:
            body["response_format"] = {"type": "json_object"}
        jobs.append((body, body["stream"] and rng.random() < 0.05))
    done, samples, lock = [0], [(0, server.rss_mib())], threading.Lock()
    every = max(1, n // 10)

    def run(job: tuple[dict, bool]) -> None:
        send(server, *job)
        with lock:
            done[0] += 1
            if done[0] % every == 0:
                samples.append((done[0], server.rss_mib()))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, jobs))
    return samples


# ---- the report ----------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="embedded,mistral-125m", help="comma-separated (default: both)")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels (default: 1,8,32)")
    p.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends (default: 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default: 64)")
    p.add_argument("--prompt-words", type=int, default=60,
                   help="prompts of 5 to this many words (default: 60, ~10-90 tokens)")
    p.add_argument("--soak", type=int, default=2000, help="mixed requests of the memory soak; 0 = none (default: 2000)")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (default: 1)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    print(f"load average before: {os.getloadavg()}", flush=True)
    report: dict = {"levels": {}, "soak": None}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            checkpoint = None if name == "embedded" else mistral_125m_checkpoint(Path(tmp) / name)
            rows: dict = {}
            for mode, max_batch in (("batched", 32), ("one-at-a-time", 1)):
                server = Server(checkpoint, max_batch, args.threads)
                try:
                    level(server, 2, 1, 4, seed=99)  # warm-up
                    for c in levels:
                        r = level(server, c, args.requests_per_client, args.max_tokens, seed=c,
                                  words=args.prompt_words)
                        rows.setdefault(c, {})[mode] = r
                        print(f"  {name:13s} {mode:13s} {c:3d} clients: {r['tok_s']:7.1f} tok/s  p50 {r['p50']:6.2f} s"
                              f"  p95 {r['p95']:6.2f} s  max {r['max']:6.2f} s  ({r['requests']} requests)",
                              flush=True)
                    if mode == "batched" and name == "embedded" and args.soak:
                        t0 = time.perf_counter()
                        samples = soak(server, args.soak)
                        health = server.get("/health")
                        report["soak"] = {"requests": args.soak, "seconds": time.perf_counter() - t0,
                                          "rss_mib": samples, "health_after": health}
                        print(f"  soak: {args.soak} mixed requests in {time.perf_counter() - t0:.0f} s; server RSS "
                              f"MiB {' '.join(f'{m:.0f}' for _, m in samples)}; after: {health}", flush=True)
                finally:
                    server.stop()
            report["levels"][name] = rows
    print(f"load average after: {os.getloadavg()}\n")
    print("| model | clients | batched tok/s | p50 / p95 / max s | one-at-a-time tok/s | p50 / p95 / max s | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rows in report["levels"].items():
        for c, r in rows.items():
            b, o = r["batched"], r["one-at-a-time"]
            print(f"| {name} | {c} | {b['tok_s']:.0f} | {b['p50']:.2f} / {b['p95']:.2f} / {b['max']:.2f} | "
                  f"{o['tok_s']:.0f} | {o['p50']:.2f} / {o['p95']:.2f} / {o['max']:.2f} | "
                  f"{b['tok_s'] / o['tok_s']:.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
