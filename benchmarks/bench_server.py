"""Throughput and latency of `mistral-ref serve` under concurrent clients: continuous batching against a server that
serves one request at a time (the same server with --max-batch 1), and with --compile batching with the compiled
decode step too, in the same run; then memory over a soak.

    .venv/bin/python benchmarks/bench_server.py [--models embedded,mistral-125m] [--clients 1,8,32]
                                                [--requests-per-client 4] [--max-tokens 64] [--prompt-words 60]
                                                [--soak 2000] [--threads 1] [--compile] [--json out.json]

For each model (the embedded tiny Mixtral; a random-weight Mistral-shaped ~125M model with the 32k SentencePiece
vocabulary of mistral-common's v3 tokenizer, written as a checkpoint in a temporary directory) and each mode
(--max-batch 32, --max-batch 1), the script starts `python -m mistral_ref serve` in a subprocess on 127.0.0.1
and, from threads of this process, runs each concurrency level: C clients, each sending --requests-per-client
non-streaming requests back to back (greedy, ignore_eos, exactly --max-tokens tokens each, prompts of 5 to
--prompt-words words drawn with a fixed seed: a chat-like mix of short prompts and longer replies; prompt-heavy
mixes gain less, since prefill is compute-bound already at batch 1).  Per level: aggregate tokens/s (completion
tokens of all requests / wall time), p50, p95 and max request latency (the max shows whether any request starved).
The speedup column is batched aggregate tokens/s over one-at-a-time.

--compile adds a third mode: `serve --max-batch 32 --compile` (the decode step compiled by a background thread
for each new batch size and cache capacity, eagerly until it is ready), with a fresh temporary compile cache
(TORCHINDUCTOR_CACHE_DIR), so it starts cold whatever ran before.  Before timing, the server is warmed up until it
reaches steady state: the timed pass (every concurrency level, the same requests) is repeated, untimed, and after
each pass the script waits until the server process and its children use no CPU for 3 s (no compilation running:
the server is otherwise idle); steady state is a pass after which the server's `mistral_ref.compile` log (its
stderr) names no newly built step, i.e. every shape the pass used was compiled already (at most 6 passes; if the
log shows no step at all, two passes within 10% of each other's tokens/s).  The warm-up time (first request to
steady state) is printed; steps compiled during the timed pass are counted (a shape the warm-up missed).  The
"compiled / batched" column is compiled aggregate tokens/s over batched eager tokens/s at the same level.

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
import re
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

    def __init__(self, checkpoint: Path | None, max_batch: int, threads: int, compile_cache: Path | None = None):
        """compile_cache: run `serve --compile` with this (empty) directory as its compile cache, and keep the
        lines of its `mistral_ref.compile` log (stderr) in self.compile_log."""
        command = [sys.executable, "-m", "mistral_ref", "serve", *([str(checkpoint)] if checkpoint else []),
                   "--port", "0", "--model-name", "bench", "--max-batch", str(max_batch), "--threads", str(threads),
                   "--max-queue", "4096", "--max-connections", "1024", *(["--compile"] if compile_cache else [])]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("MISTRAL_REF_API_KEY", None)
        if compile_cache is not None:
            env["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache)
        self.compile_log: list[str] = []  # "... mistral_ref.compile: compiled step block: compiled and saved in ..."
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE if compile_cache else subprocess.DEVNULL, text=True)
        if compile_cache is not None:  # read stderr to the end (the access log is there too: a full pipe blocks)
            threading.Thread(target=self._read_log, daemon=True).start()
        line = self.proc.stdout.readline()
        if " on http://" not in line:
            raise SystemExit(f"the server did not start: {line!r}")
        self.host, port = line.split(" on http://")[1].split()[0].split(":")
        self.port = int(port)

    def _read_log(self) -> None:
        """Keep the compile log's lines that end a step's build: "compiled step NAME: WHAT in S s" (WHAT:
        loaded, compiled and saved, compiled (in memory), ...) or "... failed to compile (...)"."""
        for line in self.proc.stderr:
            if " mistral_ref.compile: " not in line:
                continue
            message = line.split(" mistral_ref.compile: ", 1)[1].strip()
            if re.search(r": .+ in [0-9.]+ s$", message) or "failed to compile" in message:
                self.compile_log.append(message)

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server and its descendants (inductor's compile workers, the C++
        compiler), from /proc; a child's time counts once it has been waited for (its parent's cutime)."""
        tick, children, stats = os.sysconf("SC_CLK_TCK"), {}, {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:  # gone meanwhile
                    continue
                stats[int(entry.name)] = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
                children.setdefault(int(fields[1]), []).append(int(entry.name))
        total, todo = 0, [self.proc.pid]
        while todo:
            pid = todo.pop()
            total += stats.get(pid, 0)
            todo += children.get(pid, [])
        return total / tick

    def wait_idle(self, quiet: float = 3.0, limit: float = 3600.0) -> None:
        """Block until the server (not serving any request) has used under 5% of a core for `quiet` seconds in a
        row: its background compilations are done."""
        t0, still, used = time.perf_counter(), 0.0, self.cpu_seconds()
        while still < quiet:
            if time.perf_counter() - t0 > limit:
                print(f"  warning: the server was still busy {limit:.0f} s after the warm-up pass", flush=True)
                return
            time.sleep(1.0)
            now = self.cpu_seconds()
            still = still + 1.0 if now - used < 0.05 else 0.0
            used = now

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


def warm_up_compiled(server: Server, levels: list[int], args: argparse.Namespace, max_passes: int = 6) -> dict:
    """Untimed passes of the timed run (every level, the same requests) until steady state (see the module
    docstring); returns the warm-up's seconds, passes, each pass's tokens/s per level and the compile log."""
    t0 = time.perf_counter()
    level(server, 2, 1, 4, seed=99)  # (as the other modes' warm-up)
    passes: list[list[float]] = []
    steady = False
    for n in range(1, max_passes + 1):
        seen = len(server.compile_log)
        passes.append([level(server, c, args.requests_per_client, args.max_tokens, seed=c,
                             words=args.prompt_words)["tok_s"] for c in levels])
        server.wait_idle()
        built = len(server.compile_log) - seen
        print(f"  warm-up pass {n}: {' '.join(f'{t:.1f}' for t in passes[-1])} tok/s at {args.clients} clients; "
              f"{built} compiled steps built in this pass ({time.perf_counter() - t0:.0f} s so far)", flush=True)
        if server.compile_log:
            steady = built == 0
        elif n > 1:  # no compile log at all: fall back on tokens/s settling
            if n == 2:
                print("  warning: the server logged no compiled step; steady state judged by tokens/s", flush=True)
            steady = all(abs(a - b) < 0.1 * b for a, b in zip(passes[-1], passes[-2], strict=True))
        if steady:
            break
    seconds = time.perf_counter() - t0
    if not steady:
        print(f"  warning: no steady state after {max_passes} warm-up passes ({seconds:.0f} s)", flush=True)
    return {"seconds": seconds, "passes": len(passes), "steady": steady, "tok_s_per_pass": passes,
            "compile_log": list(server.compile_log)}


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
    p.add_argument("--compile", action="store_true",
                   help="also time `serve --max-batch 32 --compile`, warmed up to steady state from a fresh compile "
                        "cache (minutes: inductor compiles every batch size and cache capacity once)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    print(f"load average before: {os.getloadavg()}", flush=True)
    report: dict = {"levels": {}, "soak": None, **({"compiled_warm_up": {}} if args.compile else {})}
    modes = [("batched", 32), ("one-at-a-time", 1), *([("compiled", 32)] if args.compile else [])]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            checkpoint = None if name == "embedded" else mistral_125m_checkpoint(Path(tmp) / name)
            rows: dict = {}
            for mode, max_batch in modes:
                compile_cache = Path(tmp) / f"compile-{name}" if mode == "compiled" else None
                server = Server(checkpoint, max_batch, args.threads, compile_cache)
                try:
                    if mode == "compiled":
                        warm = report["compiled_warm_up"][name] = warm_up_compiled(server, levels, args)
                        seen = len(server.compile_log)
                    else:
                        level(server, 2, 1, 4, seed=99)  # warm-up
                    for c in levels:
                        r = level(server, c, args.requests_per_client, args.max_tokens, seed=c,
                                  words=args.prompt_words)
                        rows.setdefault(c, {})[mode] = r
                        print(f"  {name:13s} {mode:13s} {c:3d} clients: {r['tok_s']:7.1f} tok/s  p50 {r['p50']:6.2f} s"
                              f"  p95 {r['p95']:6.2f} s  max {r['max']:6.2f} s  ({r['requests']} requests)",
                              flush=True)
                    if mode == "compiled":
                        warm["built_while_timed"] = len(server.compile_log) - seen
                        if warm["built_while_timed"]:
                            print(f"  warning: {warm['built_while_timed']} compiled steps were built during the "
                                  "timed levels (shapes the warm-up did not reach)", flush=True)
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
    print("| model | clients | batched tok/s | p50 / p95 / max s | one-at-a-time tok/s | p50 / p95 / max s | speedup |"
          + (" compiled tok/s | p50 / p95 / max s | compiled / batched |" if args.compile else ""))
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if args.compile else ""))
    for name, rows in report["levels"].items():
        for c, r in rows.items():
            b, o = r["batched"], r["one-at-a-time"]
            line = (f"| {name} | {c} | {b['tok_s']:.0f} | {b['p50']:.2f} / {b['p95']:.2f} / {b['max']:.2f} | "
                    f"{o['tok_s']:.0f} | {o['p50']:.2f} / {o['p95']:.2f} / {o['max']:.2f} | "
                    f"{b['tok_s'] / o['tok_s']:.1f}x |")
            if args.compile:
                k = r["compiled"]
                line += (f" {k['tok_s']:.0f} | {k['p50']:.2f} / {k['p95']:.2f} / {k['max']:.2f} | "
                         f"{k['tok_s'] / b['tok_s']:.2f}x |")
            print(line)
    for name, warm in report.get("compiled_warm_up", {}).items():
        print(f"\ncompiled warm-up, {name}: {warm['seconds']:.0f} s to "
              f"{'steady state' if warm['steady'] else 'the last pass (NOT steady)'} ({warm['passes']} passes of "
              f"every level; {len(warm['compile_log'])} compiled steps built; "
              f"{warm['built_while_timed']} more while timed)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
