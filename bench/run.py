"""`make bench`: the gateway next to its floor, the fake Ollama alone, on this machine, now.

Method. The repo's fake Ollama (`--tokens 64`, `qwen2.5:0.5b` paced at 10 ms per frame) and
then the gateway (`bench/gateway-setup`, `serve`) run as real processes on 127.0.0.1, each in
its own session. With two or more CPUs the gateway runs alone on the second CPU, and the fake,
wrk and this script (whose aiohttp client is the Python load generator) share the first.
Two contenders get the same workloads: `direct` (the fake itself: the floor) and `gateway`.

    non-streaming   wrk -t2, c16 and c64: POST /api/chat and /v1/chat/completions,
                    stream:false, a ~190 B system+user prompt, a 64-token reply (the fake's
                    --tokens; the gateway injects num_predict_cap 64, the same length)
    streaming       wrk c16, 64-frame streams back to back: frames/s = streams/s x 64
    TTFB            the aiohttp client below, concurrency 1, dur/2 s: time to the first body
                    byte; every stream must carry exactly 64 token frames
    paced           the client, 64 concurrent `qwen2.5:0.5b` streams (ideal stream ~640 ms)
    memory          spawn-to-first-200 on /healthz, RSS and open fds from /proc

Each workload gets a 1 s warm-up of itself first. Gateway CPU is utime+stime of its process
and its descendants (/proc/PID/stat), taken before and after the measured run and divided by
requests or frames. Peak RSS is sampled at 4 Hz. The machine may be shared, so every workload
also records the CPU that processes other than ours used (/proc/stat minus our processes).
One markdown table goes to stdout with notes (pinning, versions, foreign CPU, errors, the
gateway log's non-200 statuses and warnings), progress to stderr; logs are kept when anything
failed; `--out FILE` appends the raw results as JSON lines. `--soak S` runs a steady mixed
load (about 200 req/s plus 8 paced streams) against the gateway instead and reports RSS and
fd drift. Everything is bounded (wrk -d/--timeout, a client deadline and stream cap, a hard
timeout); every process started here is ended by PID (SIGTERM, SIGKILL after 5 s) on any exit.
Needs only the stdlib and aiohttp (3.8.4 and newer), plus wrk and taskset.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import aiohttp

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
API, V1 = "/api/chat", "/v1/chat/completions"
PATHS = (("api", API), ("v1", V1))
MODEL, PACED_MODEL, FRAME_MS, FRAMES = "llama3.2:1b", "qwen2.5:0.5b", 10, 64
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Why is the sky blue? Answer in one short paragraph."}]
WARMUP_S, GRACE_S, MAX_STREAMS = 1.0, 5.0, 200_000
SOAK_RATE, SOAK_STREAMS, SOAK_EVERY_S, SOAK_BASE_S = 200, 8, 5.0, 60.0
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never via a proxy


class Interrupted(BaseException):
    """SIGINT, SIGTERM or the hard timeout: unwind to the cleanup in main()."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def body(path: str, stream: bool, frames: int = 0, model: str = MODEL) -> bytes:
    obj: dict[str, Any] = {"model": model, "messages": MESSAGES, "stream": stream}
    if frames:
        obj.update({"options": {"num_predict": frames}} if path == API else {"max_tokens": frames})
    return json.dumps(obj, separators=(",", ":")).encode()


# --- processes and /proc ---------------------------------------------------------------------

def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat from field 3 (state) on; [] if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _all_stats() -> dict[int, list[str]]:
    stats = {int(d): _stat(int(d)) for d in os.listdir("/proc") if d.isdigit()}
    return {pid: s for pid, s in stats.items() if s}


def family(pid: int) -> list[int]:
    """pid and its live descendants."""
    stats, found = _all_stats(), [pid]
    for parent in found:
        found += [p for p, s in stats.items() if int(s[1]) == parent and p not in found]
    return found


def tree_cpu(pid: int) -> float:
    """utime+stime (and reaped children's) of pid's tree, in seconds."""
    ticks = sum(sum(int(x) for x in _stat(p)[11:15]) for p in family(pid))
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    total = 0
    for p in family(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(x.split()[1]) for x in f if x.startswith("VmRSS:")), 0)
        except OSError:
            pass
    return total / 1024


def machine_busy() -> float:
    """CPU seconds all CPUs spent in user, nice, system and steal since boot (not irq and
    softirq, which the kernel may charge to no process: loopback traffic lands there)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, _irq, _softirq, steal = (
            int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + steal) / os.sysconf("SC_CLK_TCK")


def our_cpu(pids: list[int]) -> float:
    """CPU seconds of this script, its reaped children (wrk) and the trees of `pids`."""
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
            + sum(tree_cpu(p) for p in pids))


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Procs:
    """Every process started here, each in its own session, ended by PID."""

    def __init__(self, pin: tuple[int, int] | None) -> None:
        self.pin = pin
        self.live: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], where: int, log_path: str = "", capture: bool = False,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """`where` 0: with the load generator; 1: the gateway's CPU (taskset execs in place)."""
        if self.pin:
            argv = ["taskset", "-c", str(self.pin[where])] + argv
        out: Any = subprocess.PIPE if capture else open(log_path or os.devnull, "ab")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": REPO, **(env or {})},
                             start_new_session=True)
        if not capture:
            out.close()
        self.live.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> int | None:
        """SIGTERM p and the rest of its session, SIGKILL whatever is left after GRACE_S."""
        if p in self.live:
            self.live.remove(p)
        if p.poll() is not None:
            return p.returncode
        # p is not reaped, so its PID (= its session's id) is still ours
        members = [q for q, s in _all_stats().items() if int(s[3]) == p.pid and q != p.pid]
        for pid in [p.pid] + members:
            _signal(pid, signal.SIGTERM)
        try:
            p.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        for pid in members:
            if _stat(pid) and int(_stat(pid)[3]) == p.pid:
                _signal(pid, signal.SIGKILL)
        return p.returncode

    def stop_all(self) -> None:
        for p in reversed(list(self.live)):
            self.stop(p)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class Sampler(threading.Thread):
    """(seconds since start, RSS MiB, fds) of a process every `every` seconds."""

    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.t0 = pid, every, time.monotonic()
        self.samples: list[tuple[float, float, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            t = time.monotonic() - self.t0
            self.samples.append((t, rss_mib(self.pid), fd_count(self.pid)))
            if self.stopped.wait(self.every):
                return

    def finish(self) -> list[tuple[float, float, int]]:
        self.stopped.set()
        self.join()
        return self.samples


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with OPENER.open(url, timeout=2.0) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


# --- load ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    id: str
    tool: str       # "wrk" or "client"
    path: str
    body: bytes
    conns: int
    secs: float
    frames: int     # token frames per reply (0: not streamed)
    interval: float = 0.0   # client only: seconds between one worker's requests (0: back to back)


def workloads(dur: float) -> list[Workload]:
    w = [Workload(f"ns_{t}_c{c}", "wrk", p, body(p, False), c, dur, 0)
         for t, p in PATHS for c in (16, 64)]
    w += [Workload(f"st_{t}_c16", "wrk", p, body(p, True, FRAMES), 16, dur, FRAMES)
          for t, p in PATHS]
    w += [Workload(f"ttfb_{t}_c1", "client", p, body(p, True, FRAMES), 1, max(0.5, dur / 2), FRAMES)
          for t, p in PATHS]
    w += [Workload(f"paced_{t}_c64", "client", p, body(p, True, FRAMES, PACED_MODEL), 64, dur,
                   FRAMES) for t, p in PATHS]
    return w


def run_wrk(procs: Procs, base: str, key: str, w: Workload) -> dict[str, Any]:
    secs = max(1, round(w.secs))
    argv = ["wrk", "-t2", f"-c{w.conns}", f"-d{secs}s", "--timeout", "10s",
            "-s", os.path.join(BENCH, "post.lua"), base + w.path]
    p = procs.start(argv, 0, capture=True, env={"WRK_BODY": w.body.decode(), "BENCH_KEY": key})
    try:
        out = p.communicate(timeout=secs + 30)[0].decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        procs.stop(p)
        return {"errors": 1, "error_kinds": {"wrk overran": 1}}
    procs.stop(p)
    line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        return {"errors": 1, "error_kinds": {"wrk: " + out.strip()[-200:]: 1}}
    r = json.loads(line[8:])
    kinds = {k[4:]: v for k, v in r.items() if k.startswith("err_") and v}
    return {"requests": r["requests"], "elapsed": r["duration_us"] / 1e6,
            "frames": r["requests"] * w.frames, "errors": sum(kinds.values()), "error_kinds": kinds,
            "lat_p50_ms": r["lat_p50_us"] / 1e3, "lat_p99_ms": r["lat_p99_us"] / 1e3}


@dataclass
class ClientStats:
    started: int = 0
    done: int = 0
    frames: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    ttfb: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)


def token_frame(line: bytes, native: bool) -> bool:
    """A token frame: an NDJSON line with done:false, or an SSE chunk without finish_reason."""
    if not native:
        if not line.startswith(b"data: {"):
            return False
        line = line[6:]
    elif not line.strip():
        return False
    obj = json.loads(line)
    if native:
        return obj.get("done") is False
    return (obj.get("choices") or [{"finish_reason": "-"}])[0].get("finish_reason") is None


async def _one(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
               w: Workload, stats: ClientStats) -> None:
    t0, first, frames, buf = time.perf_counter(), 0.0, 0, b""
    try:
        async with session.post(url, data=w.body, headers=headers) as r:
            if r.status != 200:
                await r.read()
                stats.errors[f"status {r.status}"] += 1
                return
            async for data in r.content.iter_any():
                first = first or time.perf_counter()
                *lines, buf = (buf + data).split(b"\n")
                frames += sum(token_frame(x, w.path == API) for x in lines)
            frames += token_frame(buf, w.path == API)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        stats.errors[type(exc).__name__] += 1
        return
    stats.done += 1
    stats.frames += frames
    stats.ttfb.append(first - t0 if first else 0.0)
    stats.total.append(time.perf_counter() - t0)
    if frames != w.frames:
        stats.errors[f"{frames} token frames, expected {w.frames}"] += 1


async def client_load(base: str, key: str, works: list[Workload], cap: int = MAX_STREAMS
                      ) -> ClientStats:
    """Each workload's `conns` workers send requests until its `secs` (or `cap` requests)."""
    stats, headers = ClientStats(), {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    t0 = time.monotonic()

    async def worker(session: aiohttp.ClientSession, w: Workload) -> None:
        due = time.monotonic()
        while time.monotonic() < t0 + w.secs and stats.started < cap:
            stats.started += 1
            await _one(session, base + w.path, headers, w, stats)
            due = max(due + w.interval, time.monotonic() - w.interval)   # no catch-up bursts
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        await asyncio.gather(*(worker(session, w) for w in works for _ in range(w.conns)))
    return stats


def pct(xs: list[float], p: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1e3 if xs else None


def run_client(base: str, key: str, w: Workload) -> dict[str, Any]:
    t0 = time.monotonic()
    s = asyncio.run(client_load(base, key, [w]))
    return {"requests": s.done, "elapsed": time.monotonic() - t0, "frames": s.frames,
            "errors": sum(s.errors.values()), "error_kinds": dict(s.errors),
            "ttfb_p50_ms": pct(s.ttfb, 50), "ttfb_p99_ms": pct(s.ttfb, 99),
            "lat_p50_ms": pct(s.total, 50), "lat_p99_ms": pct(s.total, 99)}


# --- contenders ------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    base: str
    key: str = ""
    pid: int | None = None               # the gateway's; None for direct
    fake: int = 0                        # the fake Ollama's
    info: dict[str, Any] = field(default_factory=dict)
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)


def start_fake(procs: Procs, rundir: str, port: int) -> Target:
    argv = [sys.executable, "-m", "neuraldrive_gw.devtools.fake_ollama", "--port", str(port),
            "--tokens", str(FRAMES), "--model", MODEL, "--model", PACED_MODEL,
            "--pace", f"{PACED_MODEL}={FRAME_MS}"]
    p = procs.start(argv, 0, os.path.join(rundir, "fake.log"))
    base = f"http://127.0.0.1:{port}"
    if not wait_ready(base + "/api/tags", p, 30):
        raise SystemExit(f"bench: the fake Ollama did not start; see {rundir}/fake.log")
    return Target("direct", base, fake=p.pid)


def start_gateway(procs: Procs, rundir: str, port: int, direct: Target
                  ) -> tuple[Target, subprocess.Popen[bytes]]:
    workdir = os.path.join(rundir, "gw")
    os.mkdir(workdir)
    setup = procs.start([os.path.join(BENCH, "gateway-setup"), workdir, sys.executable], 0,
                        capture=True)
    out = setup.communicate(timeout=120)[0].decode("utf-8", "replace")
    if procs.stop(setup) != 0 or not out.split():
        raise SystemExit("bench: bench/gateway-setup failed:\n" + out[-1500:])
    key = out.split()[-1]
    t0 = time.monotonic()
    p = procs.start([sys.executable, "-m", "neuraldrive_gw", "serve", "--config",
                     os.path.join(workdir, "gw.yaml"), "--listen", f"127.0.0.1:{port}",
                     "--upstream", direct.base], 1, os.path.join(rundir, "gateway.log"))
    base = f"http://127.0.0.1:{port}"
    if not wait_ready(base + "/healthz", p):
        raise SystemExit(f"bench: the gateway did not become ready; see {rundir}/gateway.log")
    gw = Target("gateway", base, key, p.pid, fake=direct.fake,
                info={"ready_s": time.monotonic() - t0})
    time.sleep(0.5)
    gw.info.update(rss_start=rss_mib(p.pid), fds_start=fd_count(p.pid))
    return gw, p


def smoke(t: Target) -> list[str]:
    """One request of every shape the workloads send; what went wrong, if anything."""
    shapes = {(w.path, w.body): replace(w, conns=1, secs=30) for w in workloads(1)}.values()
    return [f"{w.id}: {k}" for w in shapes
            for k in asyncio.run(client_load(t.base, t.key, [w], cap=1)).errors]


def run_load(procs: Procs, t: Target, w: Workload) -> dict[str, Any]:
    return run_wrk(procs, t.base, t.key, w) if w.tool == "wrk" else run_client(t.base, t.key, w)


def measure(procs: Procs, t: Target, w: Workload) -> dict[str, Any]:
    """Warm up, then run `w`; add the gateway's CPU seconds and other processes' CPU use."""
    run_load(procs, t, replace(w, secs=WARMUP_S))
    ours = [t.fake] + ([t.pid] if t.pid else [])
    cpu0 = tree_cpu(t.pid) if t.pid else 0.0
    busy0, ours0, t0 = machine_busy(), our_cpu(ours), time.monotonic()
    res = run_load(procs, t, w)
    foreign = machine_busy() - busy0 - (our_cpu(ours) - ours0)
    res["foreign_cores"] = max(0.0, foreign) / (time.monotonic() - t0)
    n, frames, secs = res.get("requests", 0), res.get("frames", 0), res.get("elapsed", 0.0)
    if secs:
        res.update(req_per_s=n / secs, frames_per_s=frames / secs)
    if t.pid:
        res["cpu_s"] = cpu = tree_cpu(t.pid) - cpu0
        res.update({k: 1e6 * cpu / v for k, v in (("cpu_us_per_req", n),
                                                  ("cpu_us_per_frame", frames)) if v})
    return res


def bench_target(procs: Procs, t: Target, dur: float, emit: Callable[[dict[str, Any]], None]
                 ) -> None:
    """Smoke-test `t`, then measure every workload; the gateway's memory figures into t.info."""
    problems = smoke(t)
    if problems:
        t.info["error"] = "smoke test failed: " + "; ".join(problems)
        log(f"[{t.name}] {t.info['error']}")
        return
    work, sampler = workloads(dur), None
    if t.pid:
        for w in work:   # a first warm-up of every wrk body, for the idle RSS
            if w.tool == "wrk" and w.conns == 16:
                run_wrk(procs, t.base, t.key, replace(w, secs=WARMUP_S))
        time.sleep(1.0)
        t.info["rss_idle"] = rss_mib(t.pid)
        sampler = Sampler(t.pid, 0.25)
        sampler.start()
    for w in work:
        t.tests[w.id] = res = measure(procs, t, w)
        emit({"type": "test", "contender": t.name, "test": w.id, **res})
        cpu = f", gateway CPU {res['cpu_s']:.2f} s" if "cpu_s" in res else ""
        log(f"[{t.name}] {w.id:13} {res.get('requests', 0):7} done in "
            f"{res.get('elapsed', 0):5.1f} s, errors {res['errors']}{cpu}")
    if t.pid and sampler:
        t.info["rss_peak"] = max(s[1] for s in sampler.finish())
        time.sleep(1.0)
        t.info.update(rss_after=rss_mib(t.pid), fds_after=fd_count(t.pid))


# --- the table -------------------------------------------------------------------------------

Getter = Callable[[Target], "float | None"]


def of(test: str, name: str) -> Getter:
    return lambda t: t.tests.get(test, {}).get(name)


def info(name: str) -> Getter:
    return lambda t: t.info.get(name)


def errors(t: Target) -> float:
    return float(sum(r["errors"] for r in t.tests.values()))


def rows(dur: float) -> list[tuple[str, Getter | None, int]]:
    """(label, getter, decimals) per table row; a row without a getter is a heading."""
    out: list[tuple[str, Getter | None, int]] = [
        (f"non-streaming chat, wrk -t2, {dur:g} s", None, 0)]
    for tag, path in PATHS:
        for c in (16, 64):
            t = f"ns_{tag}_c{c}"
            out += [(f"{path} c{c} req/s ↑", of(t, "req_per_s"), 0),
                    (f"{path} c{c} p50 ms ↓", of(t, "lat_p50_ms"), 2),
                    (f"{path} c{c} p99 ms ↓", of(t, "lat_p99_ms"), 2),
                    (f"{path} c{c} gateway CPU µs/req ↓", of(t, "cpu_us_per_req"), 0)]
    out.append((f"streaming, {FRAMES} frames back to back, wrk c16", None, 0))
    for tag, path in PATHS:
        out += [(f"{path} frames/s ↑", of(f"st_{tag}_c16", "frames_per_s"), 0),
                (f"{path} gateway CPU µs/frame ↓", of(f"st_{tag}_c16", "cpu_us_per_frame"), 1)]
    out.append(("time to first byte, aiohttp client, c1", None, 0))
    for tag, path in PATHS:
        out += [(f"{path} TTFB p50 ms ↓", of(f"ttfb_{tag}_c1", "ttfb_p50_ms"), 2),
                (f"{path} TTFB p99 ms ↓", of(f"ttfb_{tag}_c1", "ttfb_p99_ms"), 2)]
    out.append((f"paced: 64 streams, {FRAME_MS} ms/frame (ideal {FRAMES * FRAME_MS} ms)", None, 0))
    for tag, path in PATHS:
        t = f"paced_{tag}_c64"
        out += [(f"{path} frames/s ↑", of(t, "frames_per_s"), 0),
                (f"{path} stream p99 ms ↓", of(t, "lat_p99_ms"), 0),
                (f"{path} gateway CPU µs/frame ↓", of(t, "cpu_us_per_frame"), 1)]
    out += [("start-up and memory (gateway process tree)", None, 0),
            ("ready s (spawn → 200 on /healthz) ↓", info("ready_s"), 2),
            ("RSS after start MiB ↓", info("rss_start"), 1),
            ("RSS idle after warm-up MiB ↓", info("rss_idle"), 1),
            ("RSS peak under load MiB ↓", info("rss_peak"), 1),
            ("RSS after load MiB ↓", info("rss_after"), 1),
            ("open fds after start", info("fds_start"), 0),
            ("open fds after load", info("fds_after"), 0),
            ("errors, all workloads ↓", errors, 0)]
    return out


def fmt(v: float | None, nd: int) -> str:
    return "–" if v is None else f"{v:,.{nd}f}"


def render(direct: Target, gw: Target, dur: float) -> list[str]:
    lines = ["| metric | direct | gateway | gateway/direct |", "|---|---:|---:|---:|"]
    for label, get, nd in rows(dur):
        if get is None:
            lines.append(f"| **{label}** | | | |")
            continue
        a, b = get(direct), get(gw)
        ratio = f"{b / a:.2f}" if a and b is not None and not label.startswith("errors") else "–"
        lines.append(f"| {label} | {fmt(a, nd)} | {fmt(b, nd)} | {ratio} |")
    return lines


def notes(pin: tuple[int, int] | None, targets: list[Target]) -> list[str]:
    n = [f"CPU pinning (taskset): gateway alone on CPU {pin[1]}; fake Ollama, wrk and the Python "
         f"client on CPU {pin[0]}." if pin else "CPU pinning: **not used** (1 CPU or no taskset).",
         f"Interpreter {sys.executable} (Python {sys.version.split()[0]}), aiohttp "
         f"{aiohttp.__version__}; load average at start {os.getloadavg()[0]:.2f}."]
    seen = [(r["foreign_cores"], f"{t.name} {k}") for t in targets for k, r in t.tests.items()
            if "foreign_cores" in r]
    if seen:
        worst, where = max(seen)
        n.append(f"Other processes on this machine used up to {worst:.2f} cores (during {where}; "
                 f"mean {sum(v for v, _ in seen) / len(seen):.2f})"
                 + ("; figures taken then are disturbed." if worst > 0.1 else "."))
    for t in targets:
        if "error" in t.info:
            n.append(f"**{t.name}: {t.info['error']}**")
        bad = {k: r["error_kinds"] for k, r in t.tests.items() if r["errors"]}
        n.append(f"{t.name} errors: " + ("; ".join(f"{k} {v}" for k, v in bad.items()) or "none"))
    return ["* " + x for x in n]


def gateway_log(rundir: str) -> list[str]:
    """Non-200 statuses (with outcome) and WARNING/ERROR lines in the gateway's log.

    Some 499s are expected: wrk closes its connections mid-request when its time is up.
    """
    seen: Counter[str] = Counter()
    first: dict[str, str] = {}
    with open(os.path.join(rundir, "gateway.log"), errors="replace") as f:
        for line in f:
            m = re.search(r" status=(\d+) .*outcome=(.*?) ms=", line)
            kind = (f"status {m[1]} {m[2]}" if m and m[1] != "200" else
                    line.split(" ", 1)[0] if line.startswith(("WARNING", "ERROR")) else "")
            if kind:
                seen[kind] += 1
                first.setdefault(kind, line.strip()[:160])
    return [f"gateway log: {k} ×{n}" + ("" if k.startswith("status") else f" (first: {first[k]})")
            for k, n in seen.most_common(6)]


# --- soak ------------------------------------------------------------------------------------

def soak(gw: Target, secs: float, emit: Callable[[dict[str, Any]], None]) -> list[str]:
    """A steady mixed load for `secs`; RSS and fd drift from the SOAK_BASE_S sample to the end.

    Both figures come from samples taken under load (the last one at least 1 s before the
    load stops), so open connections count the same at both ends.
    """
    ns = [Workload(f"soak_ns_{t}", "client", p, body(p, False), 4, secs, 0, 8 / SOAK_RATE)
          for t, p in PATHS]     # 2 x 4 workers, each a request every 40 ms: ~200 req/s
    paced = Workload("soak_paced", "client", V1, body(V1, True, FRAMES, PACED_MODEL),
                     SOAK_STREAMS, secs, FRAMES)
    assert gw.pid is not None
    sampler, cpu0 = Sampler(gw.pid, SOAK_EVERY_S), tree_cpu(gw.pid)
    sampler.start()
    log(f"[soak] {secs:g} s: ~{SOAK_RATE} req/s non-streaming + {SOAK_STREAMS} paced streams")
    stats = asyncio.run(client_load(gw.base, gw.key, ns + [paced], cap=int(secs * SOAK_RATE * 2)))
    samples, cpu_pct = sampler.finish(), 100 * (tree_cpu(gw.pid) - cpu0) / secs
    time.sleep(1.0)
    t60, rss60, fds60 = min(samples, key=lambda s: abs(s[0] - min(SOAK_BASE_S, secs / 2)))
    t_end, rss_end, fds_end = [s for s in samples if s[0] <= secs - 1][-1]
    change, streams = 100 * (rss_end - rss60) / rss60, stats.frames // FRAMES
    gw.tests["soak"] = {"errors": sum(stats.errors.values())}
    emit({"type": "soak", "secs": secs, "samples": samples, "requests": stats.done,
          "streams": streams, "errors": dict(stats.errors)})
    lines = ["| soak metric | value |", "|---|---:|", f"| duration s | {secs:g} |",
             f"| RSS at {t60:.0f} s MiB | {rss60:.1f} |",
             f"| RSS at end ({t_end:.0f} s) MiB | {rss_end:.1f} |",
             f"| RSS change % | {change:+.2f} |",
             f"| fds at {t60:.0f} s | {fds60} |", f"| fds at end ({t_end:.0f} s) | {fds_end} |",
             f"| RSS MiB / fds 1 s after the load | {rss_mib(gw.pid):.1f} / {fd_count(gw.pid)} |",
             f"| requests done (non-streaming + paced streams) | {stats.done - streams:,} + "
             f"{streams:,} |", f"| gateway CPU, % of one core | {cpu_pct:.0f} |",
             f"| errors | {sum(stats.errors.values())} |", "",
             f"{'PASS' if change <= 5 else 'FAIL'}: RSS at end within 5 % of RSS at {t60:.0f} s "
             f"({change:+.2f} %)",
             f"{'PASS' if fds_end <= fds60 else 'FAIL'}: no fd growth ({fds60} → {fds_end})", "",
             f"* RSS MiB every {SOAK_EVERY_S:g} s: " + " ".join(f"{s[1]:.1f}" for s in samples),
             f"* fds every {SOAK_EVERY_S:g} s: " + " ".join(str(s[2]) for s in samples)]
    if stats.errors:
        lines.append("* errors: " + "; ".join(f"{k} {v}" for k, v in stats.errors.items()))
    return lines


# --- main ------------------------------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _interrupt(signum: int, _frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--dur", type=float, default=5.0, help="seconds per workload (default 5)")
    ap.add_argument("--quick", action="store_true", help="--dur 1: smoke-check the harness")
    ap.add_argument("--soak", type=float, default=0, metavar="SECONDS",
                    help="run the soak instead of the workload table")
    ap.add_argument("--out", metavar="FILE.jsonl", help="append the raw results here")
    a = ap.parse_args(argv)
    dur = 1.0 if a.quick else a.dur
    if not 1 <= dur <= 60 or not (a.soak == 0 or 10 <= a.soak <= 3600):
        ap.error("--dur must be within 1..60 s and --soak within 10..3600 s")
    if not a.soak and shutil.which("wrk") is None:
        ap.error("wrk is missing: apt-get install wrk (or make bench)")
    cpus = sorted(os.sched_getaffinity(0))
    pin = (cpus[0], cpus[1]) if len(cpus) >= 2 and shutil.which("taskset") else None
    if pin:
        os.sched_setaffinity(0, {pin[0]})   # this script hosts the Python client
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(sig, _interrupt)
    signal.alarm(int(a.soak) + 300 if a.soak else max(900, int(40 * dur)))   # hard timeout
    run_id, t_start = time.strftime("%Y%m%dT%H%M%S"), time.monotonic()
    procs, rundir, ok = Procs(pin), tempfile.mkdtemp(prefix="nd-bench-"), True

    def emit(rec: dict[str, Any]) -> None:
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps({"run": run_id, **rec}) + "\n")

    try:
        fake_port, gw_port = free_ports(2)
        emit({"type": "meta", "python": sys.version.split()[0], "executable": sys.executable,
              "aiohttp": aiohttp.__version__, "pinned": pin is not None, "dur": dur,
              "soak": a.soak})
        direct = start_fake(procs, rundir, fake_port)
        if not a.soak:
            log(f"[direct] {len(workloads(dur))} workloads of {dur:g} s")
            bench_target(procs, direct, dur, emit)
        gw, gw_proc = start_gateway(procs, rundir, gw_port, direct)
        log(f"[gateway] ready in {gw.info['ready_s']:.2f} s (logs in {rundir})")
        if a.soak:
            out = soak(gw, a.soak, emit) + notes(pin, [])
            out += ["* " + x for x in gateway_log(rundir)]
        else:
            bench_target(procs, gw, dur, emit)
            code = procs.stop(gw_proc)
            out = render(direct, gw, dur) + [""] + notes(pin, [direct, gw])
            out += ["* " + x for x in gateway_log(rundir)]
            out.append("* Ratios compare this run only; ↑ higher is better, ↓ lower is better.")
            out.append(f"* gateway exit status after SIGTERM: {code}; "
                       f"harness runtime {time.monotonic() - t_start:.0f} s.")
            emit({"type": "summary", "direct": direct.info, "gateway": gw.info})
        failed = "error" in gw.info or "error" in direct.info     # a smoke test failed
        ok = not failed and not any(r["errors"] for t in (direct, gw) for r in t.tests.values())
        if not ok:
            out.append(f"* Errors: logs kept in {rundir}.")
        print("\n".join(out), flush=True)
        return 1 if failed else 0
    except Interrupted as exc:
        ok = False
        log(f"bench: interrupted ({exc}); stopping everything it started")
        return 130
    except BaseException:
        ok = False
        raise
    finally:
        signal.alarm(0)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        procs.stop_all()
        if ok:
            shutil.rmtree(rundir, ignore_errors=True)
        else:
            log(f"bench: logs kept in {rundir}")


if __name__ == "__main__":
    sys.exit(main())
