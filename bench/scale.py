#!/usr/bin/env python3
"""Scale checks of neuraldrive-gw with a large database: 10,000 keys in 100 tenants and
1,000,000 hash-chained audit rows (the performance issue, items 3 and 4).

    PYTHONPATH=. /path/to/python bench/scale.py [--only cli,writer,startup] [--rebuild]

Method
------
Database (built once, then cached under --cache, default /tmp/nd-scale-cache/):
  `bench/gateway-setup` makes gw.yaml, the database, the master key, the tenant `bench`
  and one real key (its token is kept next to the cached database). The other tenants and
  the 9,999 filler keys are inserted directly, every filler key with the same precomputed
  Argon2id hash (one hash instead of 10,000: the rows are what a `keys create` writes,
  only the secrets behind them are unknown). The audit rows are real rows: AuditRecord
  values, canonical JSON and the chain hash from auditchain.py, inserted with executemany
  through store.open_db (the shipped pragmas and triggers) in big transactions. They are
  spread over the last --days days, over the keys with a skew (a few busy keys, a long
  tail), 2 % unauthenticated. The build then checkpoints the WAL, so one file is copied.
  Every measurement runs on a fresh copy (migrated to this tree's schema with `init-db`).

(a) CLI: `usage`, `usage --tenant`, `usage --key`, `audit tail` (and, for information,
    `usage --since 7d` and `audit verify`), each a real `python -m neuraldrive_gw`
    process, wall time from spawn to exit, --runs times; target < 1 s.
(b) Audit writer: a child process (pinned like the gateway) runs AuditWriter on a copy of
    the database and submits AuditRecords built as pipeline.py builds them at --rate rows/s
    for --writer-secs seconds; `writer.queued` sampled every 0.5 s. Passes when the
    producer kept its rate, the writer stayed healthy, the queue stayed bounded (max well
    under max_queued) and did not trend up (least-squares slope, first vs last third).
(c) Start-up: `serve` spawned with a NOTIFY_SOCKET; time to READY=1 and to the first 200
    on /healthz (which also needs the fake Ollama discovered), and the gateway's CPU time
    by then. Start-up rebuilds the budget ledger from the audit rows of the current day and
    month, so its cost grows through the month: one more start runs with the gateway's
    wall clock moved to the last day of the month that holds the oldest row (time.time
    patched in the child; every row then falls in the month queried). When this tree's
    schema is newer than the cached database's, one more start runs on the unmigrated copy
    (the first start after an upgrade migrates in start-up).

Pinning (>= 2 CPUs): the gateway / the writer child / the CLI on CPU 1, this driver and the
fake Ollama on CPU 0. The share of CPU 1 that other processes used meanwhile is reported
(/proc/stat): the machine may be shared. Every process started is ended by PID (SIGTERM,
then SIGKILL). Bounded: each load run lasts --writer-secs (max 30) s; every wait has a
timeout; each measurement runs at most 3 times.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import datetime
import itertools
import json
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DEFAULT_CACHE = "/tmp/nd-scale-cache"
MODELS = ("llama3.2:1b", "qwen2.5:0.5b", "nomic-embed-text:latest")


# -- processes -----------------------------------------------------------------------------

_MULTI_CPU = len(os.sched_getaffinity(0)) >= 2     # read before main() pins this process


def multi_cpu() -> bool:
    return _MULTI_CPU


def pinned(cpu: int, argv: list[str]) -> list[str]:
    """argv run on one CPU (taskset) when the machine has two or more."""
    return ["taskset", "-c", str(cpu), *argv] if multi_cpu() else argv


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


class Procs:
    """Processes started by this script, each ended by its PID in stop_all()."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_fake(procs: Procs, python: str, *, tokens: int = 8) -> tuple[subprocess.Popen[bytes], int]:
    """The fake Ollama on CPU 0; returns (process, port)."""
    proc = procs.start(pinned(0, [python, "-m", "neuraldrive_gw.devtools.fake_ollama",
                                  "--port", "0", "--tokens", str(tokens)]),
                       env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()       # "listening on http://127.0.0.1:PORT"
    if not line.startswith("listening on "):
        raise RuntimeError(f"fake Ollama did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def http_get(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    ready_s: float               # spawn → READY=1
    healthz_s: float             # spawn → first 200 on /healthz
    cpu_s: float = 0.0           # the gateway's CPU time at that 200
    others: float = 0.0          # share of CPU 1 other processes used meanwhile


# `serve` with its wall clock moved by argv[1] seconds (time.time is patched before the
# gateway is imported; SystemClock reads it on every call). Monotonic time is untouched.
_SHIFTED_SERVE = """\
import sys, time
_offset = float(sys.argv.pop(1))
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + _offset
time.time_ns = lambda: _time_ns() + int(_offset * 1e9)
from neuraldrive_gw.cli import main
main()
"""


def start_gateway(procs: Procs, python: str, workdir: str, upstream_port: int, *,
                  timeout: float = 30.0, wall_offset_s: float | None = None,
                  extra_env: dict[str, str] | None = None) -> Gateway:
    """`serve` on CPU 1 with a fake NOTIFY_SOCKET; waits for READY=1 and /healthz 200.
    `wall_offset_s`: run the gateway's wall clock that far from the real one."""
    port = free_port()
    notify_path = os.path.join(workdir, "notify.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(notify_path)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.setblocking(False)
    env = child_env(NOTIFY_SOCKET=notify_path, **(extra_env or {}))
    command = [python, "-m", "neuraldrive_gw"] if wall_offset_s is None else \
        [python, "-c", _SHIFTED_SERVE, repr(wall_offset_s)]
    argv = pinned(1, [*command, "serve", "--config",
                      os.path.join(workdir, "gw.yaml"), "--listen", f"127.0.0.1:{port}",
                      "--upstream", f"http://127.0.0.1:{upstream_port}"])
    stderr = open(os.path.join(workdir, "gateway.log"), "ab")
    watch = CpuWatch(1)
    began = time.perf_counter()
    try:
        proc = procs.start(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    finally:
        stderr.close()
    ready_s: float | None = None
    healthz_s: float | None = None
    cpu_s = others = 0.0
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        while (ready_s is None or healthz_s is None) and time.perf_counter() - began < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}; see "
                                   f"{workdir}/gateway.log")
            with contextlib.suppress(BlockingIOError):
                while ready_s is None:
                    message = notify.recv(4096).decode()
                    if "READY=1" in message.split("\n"):
                        ready_s = time.perf_counter() - began
            if healthz_s is None and http_get(url, 0.5) == 200:
                healthz_s = time.perf_counter() - began
                cpu_s = cpu_seconds(proc.pid)
                others = watch.others(cpu_s) if multi_cpu() else 0.0
            time.sleep(0.002)
    finally:
        notify.close()
        os.unlink(notify_path)
    if healthz_s is None or ready_s is None:
        raise RuntimeError(f"gateway not ready within {timeout} s; see {workdir}/gateway.log")
    return Gateway(proc, port, ready_s, healthz_s, cpu_s, others)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_jiffies(cpu: int) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:9]]
                busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]   # user nice system irq softirq steal
                return busy, busy + v[3] + v[4]                  # + idle iowait
    return 0, 0


class CpuWatch:
    """How busy CPU 1 (the measured process's) was, and how much of that was others."""

    def __init__(self, cpu: int = 1) -> None:
        self.cpu = cpu
        self.start = cpu_jiffies(cpu)

    def others(self, own_cpu_s: float) -> float:
        """Fraction of CPU `cpu` used by other processes since start (own CPU time given)."""
        busy, total = cpu_jiffies(self.cpu)
        hz = os.sysconf("SC_CLK_TCK")
        span = (total - self.start[1]) / hz
        return max(0.0, ((busy - self.start[0]) / hz - own_cpu_s) / span) if span else 0.0


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def mib(path: str) -> str:
    return f"{os.path.getsize(path) / 2**20:.0f} MiB" if os.path.exists(path) else "-"


# -- building the database -----------------------------------------------------------------

@dataclass
class Scale:
    keys: int
    tenants: int
    rows: int
    days: float
    seed: int

    @property
    def tag(self) -> str:
        return f"k{self.keys}-t{self.tenants}-r{self.rows}-d{self.days:g}-s{self.seed}"


@dataclass
class Built:
    """A cached database: cache/<tag>/{gw.db, gw.yaml, api.key, token, meta.json}."""
    dir: str
    token: str
    meta: dict[str, Any]


def _key_ids(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    from neuraldrive_gw.keys import ALPHABET, ID_LEN
    ids: list[str] = []
    while len(ids) < count:
        candidate = "".join(rng.choice(ALPHABET) for _ in range(ID_LEN))
        if candidate not in taken:
            taken.add(candidate)
            ids.append(candidate)
    return ids


def build(scale: Scale, cache: str, python: str, rebuild: bool = False) -> Built:
    """The cached database for `scale`, built if missing (or --rebuild)."""
    from neuraldrive_gw import keys as keyfmt
    from neuraldrive_gw import store
    from neuraldrive_gw.auditchain import INSERT, AuditRecord, anchor, content_json, row_hash

    target = os.path.join(cache, scale.tag)
    if not rebuild and os.path.exists(os.path.join(target, "meta.json")):
        with open(os.path.join(target, "meta.json")) as f:
            meta = json.load(f)
        with open(os.path.join(target, "token")) as f:
            return Built(target, f.read().strip(), meta)
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target, mode=0o700)
    timings: dict[str, float] = {}
    began = time.perf_counter()
    setup = subprocess.run(["sh", os.path.join(REPO, "bench", "gateway-setup"), target, python],
                           env=child_env(), check=True, capture_output=True, timeout=120)
    token = setup.stdout.decode().strip().splitlines()[-1]
    with open(os.path.join(target, "token"), "w") as f:
        f.write(token + "\n")
    timings["gateway-setup"] = time.perf_counter() - began

    rng = random.Random(scale.seed)
    db = os.path.join(target, "gw.db")
    conn = store.open_db(db)
    step = time.perf_counter()
    now = time.time()
    bench_key = keyfmt.key_id(token)
    assert bench_key is not None
    shared_hash = keyfmt.hash_key(keyfmt.generate_key())   # the one Argon2 hash for fillers
    with store.write_transaction(conn):
        bench_tenant = conn.execute("SELECT id FROM tenants WHERE name = 'bench'").fetchone()[0]
        tenant_ids, tenant_names = [bench_tenant], ["bench"]
        for n in range(1, scale.tenants):
            name = f"tenant-{n:03d}"
            cur = conn.execute("INSERT INTO tenants (name, allow_all_models, weight, created_at) "
                               "VALUES (?, 1, 1, ?)", (name, now))
            tenant_ids.append(int(cur.lastrowid or 0))
            tenant_names.append(name)
        filler = _key_ids(rng, scale.keys - 1, {bench_key})
        conn.executemany(
            "INSERT INTO keys (key_id, tenant_id, label, hash, created_at) VALUES (?, ?, ?, ?, ?)",
            [(kid, tenant_ids[(i + 1) % scale.tenants], f"filler {i}", shared_hash,
              now - scale.days * 86400) for i, kid in enumerate(filler)])
    timings["tenants+keys"] = time.perf_counter() - step

    # Key i (0 = the bench key) belongs to tenant i % tenants. Traffic is skewed: weight
    # 1/(rank+10), so the busiest keys see a few thousand rows and the quietest a few dozen.
    all_keys = [bench_key, *filler]
    key_tenant = [tenant_names[i % scale.tenants] for i in range(len(all_keys))]
    order = list(range(len(all_keys)))
    rng.shuffle(order)
    cum = list(itertools.accumulate(1.0 / (rank + 10) for rank in range(len(all_keys))))
    total_weight = cum[-1]

    step = time.perf_counter()
    last_id, last_hash = anchor(conn)
    tail = conn.execute("SELECT id, row_hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    if tail is not None:
        last_id, last_hash = int(tail[0]), str(tail[1])
    span = scale.days * 86400
    start = now - span
    batch: list[tuple[Any, ...]] = []
    routes = (("/api/chat", "POST", True), ("/v1/chat/completions", "POST", True),
              ("/api/generate", "POST", True), ("/api/embed", "POST", False),
              ("/api/tags", "GET", False))
    route_cum = list(itertools.accumulate((50, 25, 10, 10, 5)))
    for i in range(scale.rows):
        duration = rng.uniform(50, 4000)
        at = start + (i + rng.random()) * span / scale.rows
        if rng.random() < 0.02:
            record = AuditRecord(request_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                                 at=at, client_ip=f"192.0.2.{rng.randrange(1, 255)}",
                                 method="POST", route="/api/chat", status=401,
                                 outcome="unauthorized", duration_ms=rng.uniform(0.2, 2))
        else:
            k = order[bisect.bisect_left(cum, rng.random() * total_weight)]
            path, method, generates = routes[bisect.bisect_left(route_cum, rng.randrange(100) + 1)]
            stream = generates and rng.random() < 0.5
            if path == "/api/tags":
                model, prompt, completion, metering = None, 0, 0, "none"
            else:
                model = MODELS[2] if path == "/api/embed" else MODELS[rng.randrange(2)]
                prompt = rng.randrange(10, 2000)
                completion = rng.randrange(1, 800) if generates else 0
                metering = "estimated" if rng.random() < 0.03 else "exact"
            refused = rng.random() < 0.01
            record = AuditRecord(
                request_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)), at=at,
                key_id=all_keys[k], tenant=key_tenant[k],
                client_ip=f"10.{k % 100}.{k // 100 % 256}.{rng.randrange(1, 255)}",
                method=method, route=path, model=model, status=429 if refused else 200,
                outcome="rate limited" if refused else "ok", stream=stream,
                prompt_tokens=0 if refused else prompt,
                completion_tokens=0 if refused else completion,
                metering="none" if refused else metering,
                bytes_out=0 if refused else rng.randrange(200, 20000),
                ttfb_ms=None if refused else rng.uniform(20, 400),
                duration_ms=duration)
        values = record.values()
        last_id += 1
        digest = row_hash(last_hash, last_id, content_json(values))
        batch.append((last_id, *values, last_hash, digest))
        last_hash = digest
        if len(batch) >= 50_000 or i == scale.rows - 1:
            with store.write_transaction(conn):
                conn.executemany(INSERT, batch)
            batch = []
    timings["audit rows"] = time.perf_counter() - step
    step = time.perf_counter()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    version = store.user_version(conn)
    conn.close()
    timings["checkpoint"] = time.perf_counter() - step
    timings["total"] = time.perf_counter() - began
    meta = {"scale": scale.__dict__, "built_at": now, "schema_version": version,
            "bench_key": bench_key, "flood_key": filler[0], "busy_key": all_keys[order[0]],
            "tenant": tenant_names[min(42, scale.tenants - 1)],
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "db_bytes": os.path.getsize(db)}
    with open(os.path.join(target, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return Built(target, token, meta)


def migrated(built: Built, python: str) -> tuple[str, float | None]:
    """The cached database at this tree's schema: (path, seconds `init-db` took to migrate
    it, None if it needed nothing). A migrated copy is cached next to the original."""
    from neuraldrive_gw import store
    if built.meta["schema_version"] >= store.SCHEMA_VERSION:
        return os.path.join(built.dir, "gw.db"), None
    tag = f"v{store.SCHEMA_VERSION}"
    path = os.path.join(built.dir, f"gw.{tag}.db")
    done = built.meta.setdefault("migrated_s", {})
    if os.path.exists(path) and tag in done:
        return path, done[tag]
    scratch = path + ".tmp"
    shutil.copy2(os.path.join(built.dir, "gw.db"), scratch)
    began = time.perf_counter()
    subprocess.run(pinned(1, [python, "-m", "neuraldrive_gw", "init-db", "--db", scratch]),
                   env=child_env(), check=True, capture_output=True, timeout=600)
    done[tag] = round(time.perf_counter() - began, 2)
    os.replace(scratch, path)
    with open(os.path.join(built.dir, "meta.json"), "w") as f:
        json.dump(built.meta, f, indent=2)
    return path, done[tag]


def prepare(built: Built, python: str, *, migrate: bool = True) -> str:
    """A fresh working directory: a copy of the cached database (migrated to this tree's
    schema, unless `migrate` is False), its master key, and gw.yaml pointing at them."""
    source = migrated(built, python)[0] if migrate else os.path.join(built.dir, "gw.db")
    workdir = tempfile.mkdtemp(prefix="nd-scale-")
    shutil.copy2(source, os.path.join(workdir, "gw.db"))
    shutil.copy2(os.path.join(built.dir, "api.key"), os.path.join(workdir, "api.key"))
    with open(os.path.join(built.dir, "gw.yaml")) as f:
        text = f.read().replace(built.dir, workdir)
    with open(os.path.join(workdir, "gw.yaml"), "w") as f:
        f.write(text)
    os.chmod(os.path.join(workdir, "gw.yaml"), 0o600)
    return workdir


# -- (a) the CLI ---------------------------------------------------------------------------

def measure_cli(built: Built, python: str, runs: int) -> list[list[Any]]:
    workdir = prepare(built, python)
    config = os.path.join(workdir, "gw.yaml")
    meta = built.meta
    commands: list[tuple[str, list[str], bool]] = [
        ("python -m neuraldrive_gw --version (start-up floor)", ["--version"], False),
        ("usage", ["usage"], True),
        (f"usage --tenant {meta['tenant']}", ["usage", "--tenant", meta["tenant"]], True),
        (f"usage --key {meta['busy_key']} (busiest key)", ["usage", "--key", meta["busy_key"]],
         True),
        ("audit tail", ["audit", "tail"], True),
        ("usage --since 7d (info)", ["usage", "--since", "7d"], False),
    ]
    rows = []
    try:
        for label, args, judged in commands:
            times, out_lines = [], 0
            for _ in range(runs):
                argv = [python, "-m", "neuraldrive_gw", *args]
                if args != ["--version"]:
                    argv += ["--config", config]
                began = time.perf_counter()
                done = subprocess.run(pinned(1, argv), env=child_env(), capture_output=True,
                                      timeout=120)
                times.append(time.perf_counter() - began)
                if done.returncode != 0:
                    raise RuntimeError(f"{label}: exit {done.returncode}: {done.stderr[-500:]!r}")
                out_lines = done.stdout.count(b"\n")
            median = statistics.median(times)
            rows.append([f"`{label}`", f"{median:.3f}", f"{max(times):.3f}", out_lines,
                         ("**met**" if median < 1.0 else "**not met**") if judged else "–"])
        began = time.perf_counter()
        done = subprocess.run(pinned(1, [python, "-m", "neuraldrive_gw", "audit", "verify",
                                         "--config", config]),
                              env=child_env(), capture_output=True, timeout=600)
        verify_s = time.perf_counter() - began
        rows.append(["`audit verify` (info, 1 run)", f"{verify_s:.3f}", f"{verify_s:.3f}",
                     done.stdout.decode().strip()[:60] or done.stderr.decode().strip()[-80:],
                     "ok" if done.returncode == 0 else f"**exit {done.returncode}**"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


# -- (b) the audit writer ------------------------------------------------------------------

async def _writer_child(config_path: str, rate: float, secs: float) -> dict[str, Any]:
    from neuraldrive_gw.audit import AuditWriter
    from neuraldrive_gw.auditchain import AuditRecord
    from neuraldrive_gw.config import load_config

    config = load_config(config_path)
    conn = sqlite3.connect(config.paths.database)
    keys = conn.execute("SELECT key_id, tenants.name FROM keys "
                        "JOIN tenants ON tenants.id = keys.tenant_id").fetchall()
    before = conn.execute("SELECT count(*) FROM audit").fetchone()[0]
    conn.close()
    writer = AuditWriter(config.paths.database, busy_timeout=config.audit.busy_timeout_s,
                         max_queued=config.audit.max_queued)
    await writer.start()
    loop = asyncio.get_running_loop()
    rng = random.Random(7)
    samples: list[tuple[float, int, int, bool]] = []
    submitted = 0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = loop.time()

    async def sample() -> None:
        while True:
            samples.append((loop.time() - t0, writer.queued, writer.written, writer.healthy))
            await asyncio.sleep(0.5)

    sampler = loop.create_task(sample())
    try:
        while (elapsed := loop.time() - t0) < secs:
            due = int(rate * elapsed) - submitted
            for _ in range(due):
                key, tenant = keys[rng.randrange(len(keys))]
                started = time.monotonic()
                writer.submit(AuditRecord(
                    request_id=str(uuid.uuid4()), at=time.time(), key_id=key, tenant=tenant,
                    client_ip="127.0.0.1", method="POST", route="/api/chat",
                    model="llama3.2:1b", status=200, outcome="ok", stream=False,
                    prompt_tokens=rng.randrange(10, 2000), completion_tokens=rng.randrange(1, 800),
                    metering="exact", bytes_out=rng.randrange(200, 20000),
                    ttfb_ms=(time.monotonic() - started) * 1000 + 30.0,
                    duration_ms=(time.monotonic() - started) * 1000 + 300.0))
            submitted += max(due, 0)
            await asyncio.sleep(0.002)
        load_s = loop.time() - t0
        samples.append((load_s, writer.queued, writer.written, writer.healthy))
        drain_began = loop.time()
        await asyncio.wait_for(writer.flush(), 30)
        drain_s = loop.time() - drain_began
    finally:
        sampler.cancel()
        await writer.close()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    conn = sqlite3.connect(config.paths.database)
    after = conn.execute("SELECT count(*) FROM audit").fetchone()[0]
    conn.close()
    return {"submitted": submitted, "load_s": load_s, "drain_s": drain_s,
            "written": writer.written, "batches": writer.batches, "dropped": writer.dropped,
            "failures": writer.failures, "rows_before": before, "rows_after": after,
            "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            "max_queued_config": config.audit.max_queued, "samples": samples}


def _slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    den = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / den if den else 0.0


def measure_writer(built: Built, python: str, rate: float, secs: float,
                   runs: int) -> tuple[list[list[Any]], list[str]]:
    rows, notes = [], []
    for run in range(1, runs + 1):
        workdir = prepare(built, python)
        try:
            watch = CpuWatch(1)
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            done = subprocess.run(
                pinned(1, [python, os.path.abspath(__file__), "--_writer-child",
                           os.path.join(workdir, "gw.yaml"), "--rate", str(rate),
                           "--writer-secs", str(secs)]),
                env=child_env(), capture_output=True, timeout=secs + 120)
            if done.returncode != 0:
                raise RuntimeError(f"writer child failed: {done.stderr.decode()[-2000:]}")
            result = json.loads(done.stdout.decode().strip().splitlines()[-1])
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            others = watch.others((after.ru_utime + after.ru_stime)
                                  - (children.ru_utime + children.ru_stime))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        samples = result["samples"]
        queued = [s[1] for s in samples]
        slope = _slope([(s[0], s[1]) for s in samples])
        third = max(1, len(queued) // 3)
        first, last = statistics.mean(queued[:third]), statistics.mean(queued[-third:])
        achieved = result["submitted"] / result["load_s"]
        write_rate = (samples[-1][2] - samples[0][2]) / (samples[-1][0] - samples[0][0])
        healthy = all(s[3] for s in samples)
        ok = (achieved >= 0.98 * rate and healthy and max(queued) < 0.1 *
              result["max_queued_config"] and slope < 0.01 * rate and
              result["rows_after"] == result["rows_before"] + result["submitted"])
        rows.append([run, f"{result['rows_before']:,}", f"{achieved:,.0f}", f"{write_rate:,.0f}",
                     max(queued), f"{statistics.mean(queued):.0f}", f"{first:.0f} → {last:.0f}",
                     f"{slope:+.1f}", "yes" if healthy else "**no**",
                     f"{result['written'] / max(result['batches'], 1):.0f}",
                     f"{result['cpu_s']:.1f} ({result['cpu_s'] / (result['load_s'] + result['drain_s']) * 100:.0f} %)",
                     f"{result['drain_s'] * 1000:.0f}",
                     f"{others * 100:.0f} %" if multi_cpu() else "–",
                     "**met**" if ok else "**not met**"])
        notes.append(f"run {run}: queued every 0.5 s: {queued}")
    return rows, notes


# -- (c) start-up --------------------------------------------------------------------------

async def _spend_query(db: str, days: float) -> float:
    from neuraldrive_gw import store
    from neuraldrive_gw.spend import spend_since
    conn = await store.open_async(db)
    try:
        began = time.perf_counter()
        await spend_since(conn, time.time() - days * 86400)
        return time.perf_counter() - began
    finally:
        await conn.close()


def _worst_day(built: Built) -> float:
    """A moment whose month holds every row: 23:00 UTC on the last day of the month of the
    oldest row. The month's budget query (`at >= first of the month`) then sums all rows."""
    oldest = built.meta["built_at"] - built.meta["scale"]["days"] * 86400
    first = datetime.datetime.fromtimestamp(oldest, datetime.timezone.utc).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (first + datetime.timedelta(days=32)).replace(day=1)
    return (following - datetime.timedelta(hours=1)).timestamp()


def measure_startup(built: Built, python: str, runs: int) -> list[list[Any]]:
    from neuraldrive_gw import store
    rows: list[list[Any]] = []
    procs = Procs()
    worst = _worst_day(built)
    try:
        _fake, fake_port = start_fake(procs, python)
        cases: list[tuple[str, bool, float | None]] = [("today", True, None)] * runs
        cases.append((f"last day of a month: gateway clock at "
                      f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(worst))} UTC, every row "
                      "in its month's budget query", True, worst))
        if built.meta["schema_version"] < store.SCHEMA_VERSION:
            cases.append((f"first start after upgrade (v{built.meta['schema_version']} → "
                          f"v{store.SCHEMA_VERSION}: the migration runs in start-up)", False,
                          None))
        for label, migrate, at in cases:
            workdir = prepare(built, python, migrate=migrate)
            try:
                gw = start_gateway(procs, python, workdir, fake_port, timeout=120,
                                   wall_offset_s=None if at is None else at - time.time())
                rss = rss_kib(gw.proc.pid) / 1024
                procs.stop(gw.proc)
                rows.append([label, f"{gw.ready_s:.3f}", f"{gw.healthz_s:.3f}",
                             f"{gw.cpu_s:.2f}", f"{gw.others * 100:.0f} %", f"{rss:.0f}",
                             "**met**" if gw.healthz_s < 1.0 else "**not met**"])
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        workdir = prepare(built, python)
        try:
            done = subprocess.run(
                pinned(1, [python, os.path.abspath(__file__), "--_spend-child",
                           os.path.join(workdir, "gw.db")]),
                env=child_env(), capture_output=True, timeout=120, check=True)
            today, month = json.loads(done.stdout.decode().strip().splitlines()[-1])
            rows.append(["(for information: the budget rebuild query `spend.spend_since` alone, "
                         "pinned like the gateway: since 1 day / since 31 days)",
                         f"{today:.3f}", f"{month:.3f}", "", "", "", "–"])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        procs.stop_all()
    return rows


# -- main ----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter for the gateway, CLI and fake (default: this one)")
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="where built databases are kept")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached database")
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--tenants", type=int, default=100)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", default="cli,writer,startup",
                    help="comma-separated: build, cli, writer, startup")
    ap.add_argument("--runs", type=int, default=3, choices=(1, 2, 3),
                    help="repetitions of each measurement (max 3)")
    ap.add_argument("--writer-runs", type=int, default=1, choices=(1, 2, 3))
    ap.add_argument("--rate", type=float, default=5000.0, help="audit rows/s to submit")
    ap.add_argument("--writer-secs", type=float, default=20.0,
                    help="seconds of writer load (max 30)")
    ap.add_argument("--_writer-child", dest="writer_child", metavar="CONFIG",
                    help=argparse.SUPPRESS)
    ap.add_argument("--_spend-child", dest="spend_child", metavar="DB", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not 1 <= args.writer_secs <= 30:
        ap.error("--writer-secs must be within 1..30")
    if args.keys < 2 or args.tenants < 1 or args.rows < 1:
        ap.error("need at least 2 keys, 1 tenant, 1 row")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.writer_child:
        result = asyncio.run(_writer_child(args.writer_child, args.rate, args.writer_secs))
        print(json.dumps(result))
        return 0
    if args.spend_child:
        print(json.dumps([asyncio.run(_spend_query(args.spend_child, days)) for days in (1, 31)]))
        return 0
    if multi_cpu():
        os.sched_setaffinity(0, {0})          # the driver stays off the measured CPU
    scale = Scale(args.keys, args.tenants, args.rows, args.days, args.seed)
    only = set(args.only.split(","))
    cached = os.path.exists(os.path.join(args.cache, scale.tag, "meta.json"))
    began = time.perf_counter()
    built = build(scale, args.cache, args.python, rebuild=args.rebuild)
    meta = built.meta
    migrate_s = migrated(built, args.python)[1]
    print(f"## Database {scale.tag}\n")
    print(table(["what", "value"], [
        ["keys / tenants / audit rows", f"{scale.keys:,} / {scale.tenants} / {scale.rows:,}"],
        ["rows spread over", f"{scale.days:g} days before {time.strftime('%Y-%m-%d %H:%M', time.gmtime(meta['built_at']))} UTC"],
        ["DB file (after checkpoint)", f"{meta['db_bytes'] / 2**20:.0f} MiB"],
        ["schema version built / this tree",
         f"{meta['schema_version']} / {__import__('neuraldrive_gw.store').store.SCHEMA_VERSION}"],
        ["generation time (s)", ", ".join(f"{k} {v}" for k, v in meta["timings_s"].items())],
        [f"`init-db` migrating it to this tree's schema (once, cached)",
         "not needed" if migrate_s is None else f"{migrate_s:.1f} s "
         f"(DB then {os.path.getsize(migrated(built, args.python)[0]) / 2**20:.0f} MiB)"],
        ["this run", "cached copy" if cached and not args.rebuild
         else f"built now in {time.perf_counter() - began:.1f} s"],
        ["CPUs / pinning", f"{os.cpu_count()} / " + ("measured process on CPU 1, driver + fake on CPU 0"
                                                    if multi_cpu() else "none (1 CPU)")],
        ["python", f"{args.python}"],
    ]))
    if "cli" in only:
        print(f"\n## (a) CLI wall time, {args.runs} runs (target < 1 s)\n")
        print(table(["command", "median s", "max s", "stdout lines", "< 1 s"],
                    measure_cli(built, args.python, args.runs)))
    if "writer" in only:
        rows, notes = measure_writer(built, args.python, args.rate, args.writer_secs,
                                     args.writer_runs)
        print(f"\n## (b) AuditWriter at {args.rate:,.0f} rows/s for {args.writer_secs:g} s "
              "(queued sampled every 0.5 s)\n")
        print(table(["run", "rows before", "submitted/s", "written/s", "max queued",
                     "mean queued", "queued first → last third", "slope rows/s",
                     "healthy", "rows/txn", "CPU s (of wall)", "drain ms",
                     "CPU 1 used by others", "verdict"], rows))
        print()
        for note in notes:
            print(f"* {note}")
    if "startup" in only:
        print(f"\n## (c) Start-up with this database, spawn → READY=1 / first 200 on /healthz "
              "(target < 1 s)\n")
        print(table(["case", "READY=1 s", "/healthz 200 s", "gateway CPU s by then",
                     "CPU 1 used by others", "RSS MiB", "< 1 s"],
                    measure_startup(built, args.python, args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
