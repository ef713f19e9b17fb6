"""Serving throughput: N concurrent requests against the same N sent one after another.

    python experiments/serving/run.py --workdir workdirs/demo

Starts `mmlm serve` on the workdir (a subprocess on 127.0.0.1), asks N held-out synthetic shapes
questions (rendered into a temporary directory, sent as data: URLs) through the `openai` client,
greedy, in rounds that alternate the two modes so that both see the same load on a shared machine:

* sequential: each request is sent when the previous answer arrived;
* concurrent: the N requests at once, as N users would send them: one thread per request over the
  synchronous client (`--client threads`, the default), or `asyncio.gather` over the async client
  (`--client asyncio`). One asyncio loop builds all N requests (about 2-3 ms of client CPU each) before
  the first one's bytes leave it, so the server idles for the first tens of milliseconds of each round;
  N threads send each request as soon as it is built, as N separate clients would.

Two workloads: the model's natural answers (one word for the demo: the per-request prefill dominates)
and fixed-length answers (`ignore_eos`, as serving benchmarks fix output lengths: decoding dominates).
Reports, per workload and mode, the aggregate completion tokens/s (all answers' tokens over the wall
time of the round), requests/s and the p50 / p99 request latency over all rounds, checks that both
modes give the same answers, and writes results.md next to this script.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import base64
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
LOAD_BEFORE = " / ".join(f"{x:.1f}" for x in os.getloadavg())
REPO = HERE.parents[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="workdirs/demo", help="training workdir of the model to serve")
    p.add_argument("--requests", type=int, default=16, help="requests per round (default 16)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each mode, alternating (default 3)")
    p.add_argument("--max_batch", type=int, default=16, help="the server's decoding slots (default 16)")
    p.add_argument("--max_tokens", type=int, default=16,
                   help="answer length limit of the natural-answers workload (default 16)")
    p.add_argument("--fixed_tokens", type=int, default=32,
                   help="answer length of the fixed-length workload (ignore_eos; default 32)")
    p.add_argument("--admit_wait_ms", type=float, default=10.0,
                   help="the server's --admit_wait_ms: how long a decode step waits for requests still being "
                        "read (default 10, the server's default; 0 turns the wait off)")
    p.add_argument("--prefill_group", type=int, default=1,
                   help="the server's --prefill_group: greedy requests sharing one prefill (default 1: alone)")
    p.add_argument("--client", choices=("threads", "asyncio"), default="threads",
                   help="how the concurrent requests are sent: one thread per request (sync client, default) "
                        "or asyncio.gather over the async client")
    p.add_argument("--seed", type=int, default=7, help="seed of the synthetic questions (default 7)")
    p.add_argument("--out", default=str(HERE / "results.md"), help="report file (default: results.md here)")
    return p


CLIENTS = {"threads": "one thread per request, each through the synchronous client",
           "asyncio": "`asyncio.gather` over the async client"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _questions(n: int, seed: int, tmp: Path) -> list[dict]:
    from mmlm.data.synth import synthesize

    synthesize("shapes", tmp, n, seed, split="bench", progress=False)
    rows = [json.loads(line) for line in (tmp / "bench_questions.jsonl").read_text().splitlines()][:n]
    for row in rows:
        data = (tmp / row["image"]).read_bytes()
        row["url"] = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return rows


def _cpu() -> str:
    name = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name}, {os.cpu_count()} cores, {isa}"


def _engine_counts(status: Any, port: int) -> np.ndarray:
    """The server's decode steps and prefill programs so far (its status endpoint, through the httpx
    client `status`)."""
    got = status.get(f"http://127.0.0.1:{port}/v1/mmlm/status", timeout=30).json()
    return np.asarray([got["steps"], got["prefills"]], np.int64)


def _summary(runs: list[dict], requests: int) -> dict:
    tokens, wall = sum(r["tokens"] for r in runs), sum(r["wall"] for r in runs)
    lat = np.concatenate([r["latency"] for r in runs]) * 1000
    return {"tok_s": tokens / wall, "req_s": requests * len(runs) / wall, "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "tokens": tokens / len(runs),
            "steps": sum(r["steps"] for r in runs) / len(runs),
            "prefills": sum(r["prefills"] for r in runs) / len(runs),
            "per_round": [r["tokens"] / r["wall"] for r in runs]}


def ratio_interval(concurrent: list[dict], sequential: list[dict], draws: int = 10_000,
                   seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the aggregate tokens/s ratio, round pairs resampled (one seed: the report
    is reproducible from the same rounds)."""
    tc, wc = (np.array([r[k] for r in concurrent], float) for k in ("tokens", "wall"))
    ts, ws = (np.array([r[k] for r in sequential], float) for k in ("tokens", "wall"))
    pick = np.random.default_rng(seed).integers(0, len(tc), (draws, len(tc)))
    ratios = (tc[pick].sum(1) / wc[pick].sum(1)) / (ts[pick].sum(1) / ws[pick].sum(1))
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def measure(args: argparse.Namespace, rows: list[dict]) -> dict:
    """Starts the server, runs both workloads in alternating rounds, stops it."""
    import openai

    # Natural answers (the demo's are one word) and fixed-length answers (`ignore_eos`, as serving
    # benchmarks such as vLLM's fix output lengths): the first is dominated by the per-request prefill,
    # the second by decoding, which is what batching shares.
    workloads = [("natural answers", args.max_tokens, False),
                 (f"{args.fixed_tokens}-token answers (ignore_eos)", args.fixed_tokens, True)]
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "mmlm.cli", "serve", "--workdir", args.workdir, "--port", str(port),
           "--max_batch", str(args.max_batch), "--max_new_tokens", str(max(args.max_tokens, args.fixed_tokens)),
           "--admit_wait_ms", str(args.admit_wait_ms), "--prefill_group", str(args.prefill_group),
           "--model_name", "bench"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    ready = threading.Event()
    threading.Thread(target=lambda: [ready.set() for line in proc.stdout if "ready at" in line], daemon=True).start()
    out: dict = {"workloads": {}}
    try:
        t0 = time.monotonic()
        while not ready.wait(0.5):
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with status {proc.returncode} before it was ready "
                                 f"(its message is above): {' '.join(cmd)}")
            if time.monotonic() - t0 > 600:
                raise SystemExit("the server did not start in 600 s")
        out["startup"] = time.monotonic() - t0
        base = dict(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        client, aclient = openai.OpenAI(**base), openai.AsyncOpenAI(**base)
        pool = ThreadPoolExecutor(len(rows))

        def request(row: dict, max_tokens: int, ignore_eos: bool) -> dict:
            return dict(model="bench", temperature=0, max_tokens=max_tokens, extra_body={"ignore_eos": ignore_eos},
                        messages=[{"role": "user", "content": [
                            {"type": "text", "text": row["text"]},
                            {"type": "image_url", "image_url": {"url": row["url"]}}]}])

        def ask(row: dict, max_tokens: int, ignore_eos: bool) -> tuple[str, int, float]:
            start = time.perf_counter()
            r = client.chat.completions.create(**request(row, max_tokens, ignore_eos))
            return r.choices[0].message.content, r.usage.completion_tokens, time.perf_counter() - start

        async def ask_async(row: dict, max_tokens: int, ignore_eos: bool) -> tuple[str, int, float]:
            start = time.perf_counter()
            r = await aclient.chat.completions.create(**request(row, max_tokens, ignore_eos))
            return r.choices[0].message.content, r.usage.completion_tokens, time.perf_counter() - start

        async def gather(max_tokens: int, ignore_eos: bool) -> list[tuple[str, int, float]]:
            return list(await asyncio.gather(*(ask_async(row, max_tokens, ignore_eos) for row in rows)))

        def sequential(max_tokens: int, ignore_eos: bool) -> list[tuple[str, int, float]]:
            return [ask(row, max_tokens, ignore_eos) for row in rows]

        def concurrent(max_tokens: int, ignore_eos: bool) -> list[tuple[str, int, float]]:
            if args.client == "asyncio":
                return loop.run_until_complete(gather(max_tokens, ignore_eos))
            return list(pool.map(lambda row: ask(row, max_tokens, ignore_eos), rows))

        loop = asyncio.new_event_loop()
        import httpx

        status = httpx.Client()  # one client for the status queries between rounds
        while status.get(f"http://127.0.0.1:{port}/v1/mmlm/status", timeout=30).json()["compiling"]:
            time.sleep(0.1)  # grouped prefill programs still compiling in the background
        out["grouped_ready"] = time.monotonic() - t0
        for name, max_tokens, ignore_eos in workloads:
            # warm-up: compiles every prompt bucket the rows need, then runs the grouped prefills once
            reference = [r[0] for r in sequential(max_tokens, ignore_eos)]
            if [r[0] for r in concurrent(max_tokens, ignore_eos)] != reference:
                raise SystemExit(f"{name}: the concurrent warm-up's answers differ from the sequential ones")
            if not ignore_eos:
                out["correct"] = sum(a.strip().lower() == r["answer"].strip().lower() for a, r in zip(reference, rows))
                out["answers"] = reference
            modes: dict[str, list[dict]] = {"sequential": [], "concurrent": []}
            for rnd in range(args.rounds):
                order = ("sequential", "concurrent") if rnd % 2 == 0 else ("concurrent", "sequential")
                for mode in order:
                    counts = _engine_counts(status, port)
                    gc.collect()  # every round starts from the same collector state (no pause left over)
                    start = time.perf_counter()
                    run_mode = sequential if mode == "sequential" else concurrent
                    res = run_mode(max_tokens, ignore_eos)
                    wall = time.perf_counter() - start
                    steps, prefills = (int(c) for c in _engine_counts(status, port) - counts)
                    if [r[0] for r in res] != reference:
                        raise SystemExit(f"{name}, {mode}: the answers differ from the first pass's")
                    modes[mode].append({"wall": wall, "tokens": sum(r[1] for r in res), "steps": steps,
                                        "prefills": prefills, "latency": [r[2] for r in res]})
                    print(f"{name}, round {rnd}, {mode}: {wall:.3f} s, {modes[mode][-1]['tokens']} tokens, "
                          f"{steps} decode steps, {prefills} prefills", flush=True)
            out["workloads"][name] = modes
        loop.run_until_complete(aclient.close())
        client.close()
        status.close()
        loop.close()
        pool.shutdown()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out["rc"] = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out["rc"] = proc.wait()
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = _questions(args.requests, args.seed, Path(tmp))
    run = measure(args, rows)
    lines = [
        "# Serving: concurrent against sequential requests",
        "",
        f"`python experiments/serving/run.py --workdir {args.workdir} --requests {args.requests} "
        f"--rounds {args.rounds} --max_batch {args.max_batch} --max_tokens {args.max_tokens} "
        f"--fixed_tokens {args.fixed_tokens} --admit_wait_ms {args.admit_wait_ms:g} "
        f"--prefill_group {args.prefill_group} --client {args.client}`",
        "",
        f"CPU: {_cpu()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '(none)')!r}; load average before the run "
        f"{LOAD_BEFORE}. The server and the client share the machine (which other work shares too), so the two "
        "modes alternate round by round.",
        "",
        f"{args.requests} held-out synthetic `shapes` questions (one 48 px image each, greedy; "
        f"{run['correct']}/{len(rows)} answered correctly), sent through the `openai` client to "
        f"`mmlm serve --max_batch {args.max_batch} --admit_wait_ms {args.admit_wait_ms:g} "
        f"--prefill_group {args.prefill_group}`; {args.rounds} rounds per mode and workload. Sequential: each "
        f"request sent when the previous answer arrived; concurrent: all {args.requests} at once ({CLIENTS[args.client]}). Both "
        f"modes gave the same answers in every round. Server start (load + compile) {run['startup']:.1f} s"
        + (f", grouped prefills compiled and run once {run['grouped_ready']:.1f} s after the start" if args.prefill_group > 1
           else "") + f"; exit "
        f"status after SIGTERM {run['rc']}.",
        "",
        "| workload | mode | tokens / round | decode steps / round | prefills / round | aggregate tokens/s "
        "| requests/s | p50 latency | p99 latency |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    for name, modes in run["workloads"].items():
        summary = {mode: _summary(r, args.requests) for mode, r in modes.items()}
        for mode, s in summary.items():
            lines.append(f"| {name} | {mode} | {s['tokens']:.0f} | {s['steps']:.1f} | {s['prefills']:.1f} | "
                         f"{s['tok_s']:.1f} | "
                         f"{s['req_s']:.1f} | "
                         f"{s['p50']:.0f} ms | {s['p99']:.0f} ms |")
        ratio = summary["concurrent"]["tok_s"] / summary["sequential"]["tok_s"]
        per_round = [c / q for c, q in zip(summary["concurrent"]["per_round"], summary["sequential"]["per_round"])]
        lo, hi = ratio_interval(modes["concurrent"], modes["sequential"])
        ratios.append(f"* {name}: **{ratio:.2f}x**, 95% bootstrap interval over the round pairs {lo:.2f}-{hi:.2f}x "
                      "(per round pair: " + ", ".join(f"{r:.2f}x" for r in per_round) + ")")
    lines += ["", "Concurrent / sequential aggregate tokens/s:", "", *ratios, ""]
    from mmlm.safe_io import write_text_atomic

    write_text_atomic(args.out, "\n".join(lines))  # an interrupted run leaves the old report whole
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
