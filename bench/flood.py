#!/usr/bin/env python3
"""Argon2 flood: what 1,000 requests with wrong keys cost the gateway and a legitimate client
(the performance issue, item 4).

    PYTHONPATH=. /path/to/python bench/flood.py [--variants unknown,wrong,wrong-default]

Method
------
The database is bench/scale.py's (10,000 keys in 100 tenants, 1,000,000 audit rows; built
and cached by it), copied afresh for each variant. A real `serve` runs on CPU 1, the fake
Ollama, this driver and the flood process on CPU 0 (>= 2 CPUs). Per variant:

1. One request with the legitimate key (the `bench` key: a real token): it must pay exactly
   one Argon2 verification (`auth.argon2_verifications` on the status socket, before/after).
2. Baseline, --baseline-secs: the legitimate key alone, sequential POST /api/chat
   (non-streaming) paced at --legit-rate requests/s; latency of each request. The counter
   must not move (a verified key is cached).
3. Flood: a separate process sends --flood requests (GET /api/tags, --concurrency at a
   time) from source address 127.0.0.2, while the legitimate client goes on from 127.0.0.1
   (the per-IP failure limiter keys on the address: sharing one would lock the legitimate
   client out too, by design). Variants:
     unknown        valid-looking tokens whose key id does not exist: no Argon2 at all;
     wrong          an existing key id with random wrong secrets: each a cache miss, one
                    Argon2 verify each (in a thread, behind the semaphore of 2), with
                    `limits.auth_failures_per_ip_per_min` raised to 100000 (worst case);
     wrong-default  the same with that limit at its default (10 a minute per address).
   Measured: the flood's answers, its duration, the gateway's CPU seconds over it
   (/proc/PID/stat, all threads), its peak RSS (VmRSS sampled every 50 ms, and VmHWM), the
   counter's increase, and the legitimate client's p50/p99 during the flood against its
   baseline (target: the flood adds at most 50 ms to p99).

Bounded: each flood stops after --max-flood-secs (max 30) s, each request has a timeout,
every process started is ended by PID (SIGTERM, then SIGKILL) in `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sqlite3
import statistics
import string
import subprocess
import sys
import time
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale  # noqa: E402  (bench/scale.py: the database, processes, pinning)

ALPHABET = string.ascii_letters + string.digits
CHAT = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hello"}],
        "stream": False}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rand(n: int, rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


# -- the flood (a child process) -----------------------------------------------------------

async def flood_child(url: str, mode: str, key_id: str, count: int, concurrency: int,
                      source: str, max_secs: float, taken: set[str]) -> dict[str, Any]:
    import aiohttp
    rng = random.Random()
    tokens = []
    for _ in range(count):
        if mode == "unknown":
            kid = rand(8, rng)
            while kid in taken:
                kid = rand(8, rng)
            tokens.append("nd-" + kid + rand(24, rng))
        else:
            tokens.append("nd-" + key_id + rand(24, rng))
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    pending = iter(tokens)
    connector = aiohttp.TCPConnector(local_addr=(source, 0), limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=max_secs)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        print("ready", flush=True)
        began = time.perf_counter()
        deadline = began + max_secs

        async def worker() -> None:
            for token in pending:
                if time.perf_counter() > deadline:
                    statuses["not sent (time limit)"] += 1
                    continue
                sent = time.perf_counter()
                try:
                    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
                        await r.read()
                        statuses[str(r.status)] += 1
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    statuses[type(exc).__name__] += 1
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - began
    return {"statuses": dict(statuses), "duration_s": duration,
            "p50_ms": pct(latencies, 0.5) * 1000, "p99_ms": pct(latencies, 0.99) * 1000}


# -- the driver ----------------------------------------------------------------------------

def status_counts(socket_path: str) -> dict[str, Any]:
    from neuraldrive_gw.status_client import get_status
    data = get_status(socket_path)
    return data["auth"]


class Legit:
    """The legitimate key: sequential requests paced at `rate` a second."""

    def __init__(self, url: str, token: str, rate: float):
        self.url, self.token, self.period = url, token, 1.0 / rate
        self.samples: list[tuple[float, float, int]] = []     # (sent at, seconds, status)
        self.stop = False

    async def one(self, session: Any) -> tuple[float, int]:
        sent = time.perf_counter()
        try:
            async with session.post(self.url, json=CHAT,
                                    headers={"Authorization": f"Bearer {self.token}"}) as r:
                await r.read()
                status = r.status
        except Exception:
            status = 0
        return time.perf_counter() - sent, status

    async def run(self, session: Any) -> None:
        next_at = time.perf_counter()
        while not self.stop:
            sent = time.perf_counter()
            seconds, status = await self.one(session)
            self.samples.append((sent, seconds, status))
            next_at += self.period
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            next_at = max(next_at, time.perf_counter() - self.period)   # no catch-up bursts

    def window(self, start: float, end: float) -> tuple[list[float], int]:
        picked = [(s, st) for t, s, st in self.samples if start <= t < end]
        return [s * 1000 for s, st in picked if st == 200], sum(1 for _, st in picked if st != 200)


async def run_variant(args: argparse.Namespace, built: scale.Built, fake_port: int,
                      procs: scale.Procs, variant: str) -> dict[str, Any]:
    import aiohttp
    workdir = scale.prepare(built, args.python)
    try:
        config = os.path.join(workdir, "gw.yaml")
        with open(config) as f:
            text = f.read()
        if variant == "wrong-default":           # the config default applies
            text = "\n".join(line for line in text.splitlines()
                             if "auth_failures_per_ip_per_min" not in line) + "\n"
        with open(config, "w") as f:
            f.write(text)
        from neuraldrive_gw.config import load_config
        limit = load_config(config).limits.auth_failures_per_ip_per_min
        sock = os.path.join(workdir, "status.sock")
        with sqlite3.connect(os.path.join(workdir, "gw.db")) as conn:
            taken = [r[0] for r in conn.execute("SELECT key_id FROM keys")]
        gw = scale.start_gateway(procs, args.python, workdir, fake_port, timeout=60,
                                 extra_env=dict(e.split("=", 1) for e in args.gateway_env))
        pid = gw.proc.pid
        base = f"http://127.0.0.1:{gw.port}"
        result: dict[str, Any] = {"variant": variant, "limit": limit}
        try:
            legit = Legit(base + "/api/chat", built.token, args.legit_rate)
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=30),
                    connector=aiohttp.TCPConnector(local_addr=("127.0.0.1", 0))) as session:
                v0 = status_counts(sock)["argon2_verifications"]
                _, first_status = await legit.one(session)
                v1 = status_counts(sock)["argon2_verifications"]
                watch, cpu_base = scale.CpuWatch(1), scale.cpu_seconds(pid)
                task = asyncio.get_running_loop().create_task(legit.run(session))
                await asyncio.sleep(args.baseline_secs)
                baseline_end = time.perf_counter()
                others_base = watch.others(scale.cpu_seconds(pid) - cpu_base)
                v2 = status_counts(sock)["argon2_verifications"]
                rss_before = scale.rss_kib(pid)
                flood_argv = scale.pinned(0, [
                    args.python, os.path.abspath(__file__), "--_flood-child", base + "/api/tags",
                    "--mode", "unknown" if variant == "unknown" else "wrong",
                    "--key-id", built.meta["flood_key"], "--flood", str(args.flood),
                    "--concurrency", str(args.concurrency),
                    "--max-flood-secs", str(args.max_flood_secs),
                    "--taken", os.path.join(workdir, "taken.txt")])
                with open(os.path.join(workdir, "taken.txt"), "w") as f:
                    f.write("\n".join(taken))
                child = await asyncio.create_subprocess_exec(
                    *flood_argv, stdout=asyncio.subprocess.PIPE, env=scale.child_env())
                try:
                    assert child.stdout is not None
                    line = await asyncio.wait_for(child.stdout.readline(), 30)
                    if line.strip() != b"ready":
                        raise RuntimeError(f"flood process: {line!r}")
                    flood_start = time.perf_counter()
                    watch, cpu_start = scale.CpuWatch(1), scale.cpu_seconds(pid)
                    peak = rss_before
                    reader = asyncio.get_running_loop().create_task(child.stdout.read())
                    while not reader.done():
                        peak = max(peak, scale.rss_kib(pid))
                        await asyncio.wait({reader}, timeout=0.05)
                        if time.perf_counter() - flood_start > args.max_flood_secs + 15:
                            raise RuntimeError("flood process overran its time limit")
                    flood_end = time.perf_counter()
                    cpu_flood = scale.cpu_seconds(pid) - cpu_start
                    others_flood = watch.others(cpu_flood)
                    await child.wait()
                finally:
                    if child.returncode is None:
                        child.terminate()
                        try:
                            await asyncio.wait_for(child.wait(), 5)
                        except asyncio.TimeoutError:
                            child.kill()
                            await child.wait()
                flood = json.loads(reader.result().decode().strip().splitlines()[-1])
                await asyncio.sleep(0.5)                 # the legitimate client settles
                legit.stop = True
                await task
            hwm = scale.rss_kib(pid, "VmHWM")
            rss_after = scale.rss_kib(pid)
            after = status_counts(sock)
            base_ms, base_err = legit.window(0, baseline_end)
            flood_ms, flood_err = legit.window(flood_start, flood_end)
            result.update({
                "first": (first_status, v0, v1), "baseline_delta": v2 - v1,
                "flood": flood, "flood_wall": flood_end - flood_start,
                "verifications": after["argon2_verifications"] - v2,
                "refused_for_failures": after.get("refused_for_failures"),
                "cpu_s": cpu_flood, "rss_before": rss_before / 1024, "rss_peak": peak / 1024,
                "hwm": hwm / 1024, "rss_after": rss_after / 1024,
                "others": (others_base, others_flood),
                "base": (len(base_ms), pct(base_ms, 0.5), pct(base_ms, 0.9), pct(base_ms, 0.99),
                         base_err),
                "during": (len(flood_ms), pct(flood_ms, 0.5), pct(flood_ms, 0.9),
                           pct(flood_ms, 0.99), flood_err)})
        finally:
            procs.stop(gw.proc)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n## Argon2 flood: {args.flood} requests, {args.concurrency} at a time, from "
          f"127.0.0.2; legitimate key at {args.legit_rate:g} req/s sequential from 127.0.0.1"
          + (f"; gateway environment {' '.join(args.gateway_env)}" if args.gateway_env else "")
          + "\n")
    rows = []
    for r in results:
        f = r["flood"]
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(f["statuses"].items()))
        rows.append([r["variant"], r["limit"], answers, f"{r['flood_wall']:.1f}",
                     f"{sum(f['statuses'].values()) / r['flood_wall']:.0f}",
                     f"{f['p50_ms']:.0f} / {f['p99_ms']:.0f}", r["verifications"],
                     f"{r['cpu_s']:.1f} ({r['cpu_s'] / r['flood_wall'] * 100:.0f} %)",
                     f"{r['rss_before']:.0f} → {r['rss_peak']:.0f} → {r['rss_after']:.0f} "
                     f"(HWM {r['hwm']:.0f})"])
    print(scale.table(["variant", "failures/IP/min", "flood answers", "flood s", "flood req/s",
                       "flood p50/p99 ms", "Argon2 verifications", "gateway CPU s (of flood)",
                       "gateway RSS MiB before → peak → after"], rows))
    print()
    rows = []
    for r in results:
        n0, p50a, p90a, p99a, err0 = r["base"]
        n1, p50b, p90b, p99b, err1 = r["during"]
        delta = p99b - p99a
        rows.append([r["variant"], f"{n0}: {p50a:.1f} / {p90a:.1f} / {p99a:.1f}",
                     f"{n1}: {p50b:.1f} / {p90b:.1f} / {p99b:.1f}", f"{delta:+.1f}",
                     f"{err0} / {err1}",
                     " / ".join(f"{x * 100:.0f} %" for x in r["others"]) if scale.multi_cpu()
                     else "–",
                     "**met**" if delta <= 50 and not err1 else "**not met**"])
    print(scale.table(["variant", "legit baseline: n: p50 / p90 / p99 ms",
                       "legit during flood: n: p50 / p90 / p99 ms", "p99 added ms",
                       "legit errors base / flood", "CPU 1 used by others base / flood",
                       "≤ 50 ms added"], rows))
    print()
    rows = []
    for r in results:
        status, v0, v1 = r["first"]
        ok = v1 - v0 == 1 and r["baseline_delta"] == 0 and status == 200
        rows.append([r["variant"], status, f"{v0} → {v1}", r["baseline_delta"],
                     r["refused_for_failures"], "yes" if ok else "**no**"])
    print(scale.table(["variant", "first legit request", "verifications before → after it",
                       "verifications during baseline", "refused for failures (429)",
                       "one verification per key"], rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--cache", default=scale.DEFAULT_CACHE)
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--tenants", type=int, default=100)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--variants", default="unknown,wrong,wrong-default")
    ap.add_argument("--flood", type=int, default=1000, help="flood requests (max 5000)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--legit-rate", type=float, default=50.0)
    ap.add_argument("--baseline-secs", type=float, default=8.0)
    ap.add_argument("--max-flood-secs", type=float, default=30.0)
    ap.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for the gateway (repeatable), e.g. "
                         "MALLOC_MMAP_THRESHOLD_=1048576")
    ap.add_argument("--_flood-child", dest="flood_child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--key-id", help=argparse.SUPPRESS)
    ap.add_argument("--taken", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not 1 <= args.flood <= 5000 or not 1 <= args.concurrency <= 256:
        ap.error("--flood must be 1..5000, --concurrency 1..256")
    if not 1 <= args.max_flood_secs <= 30 or not 1 <= args.baseline_secs <= 30:
        ap.error("--max-flood-secs and --baseline-secs must be within 1..30")
    bad = set(args.variants.split(",")) - {"unknown", "wrong", "wrong-default"}
    if bad:
        ap.error(f"unknown variants: {', '.join(sorted(bad))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.flood_child:
        with open(args.taken) as f:
            taken = set(f.read().split())
        print(json.dumps(asyncio.run(flood_child(
            args.flood_child, args.mode, args.key_id, args.flood, args.concurrency,
            "127.0.0.2", args.max_flood_secs, taken))))
        return 0
    if scale.multi_cpu():
        os.sched_setaffinity(0, {0})
    built = scale.build(scale.Scale(args.keys, args.tenants, args.rows, args.days, args.seed),
                        args.cache, args.python)
    results = []
    procs = scale.Procs()
    try:
        _fake, fake_port = scale.start_fake(procs, args.python)
        for variant in args.variants.split(","):
            results.append(asyncio.run(run_variant(args, built, fake_port, procs, variant)))
    finally:
        procs.stop_all()
    print(f"Database {built.meta['scale']}: {os.path.getsize(scale.migrated(built, args.python)[0]) / 2**20:.0f} MiB; "
          f"CPUs {os.cpu_count()}, " + ("gateway on CPU 1, driver, flood and fake Ollama on CPU 0"
                                         if scale.multi_cpu() else "no pinning"))
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
