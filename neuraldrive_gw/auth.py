"""Authentication: credential extraction, the master key file, and DB key verification.

Security contract:
* Exactly one credential per request (`Authorization: Bearer` or `x-api-key`); more → 400.
* Malformed, unknown, revoked, expired and wrong keys all get the same 401.
* An unknown key id costs no Argon2 work. Argon2 runs only on a cache miss, in a thread,
  behind a small semaphore (each verify allocates 19 MiB).
* Verified keys are cached under HMAC-SHA256(per-process secret, key), never the key
  itself, and each hit is re-checked against the current snapshot (revocation, expiry,
  rotation: the stored hash changed) so a change committed by the CLI wins on the next
  request after the snapshot refresh.
* The master key is compared in constant time; a missing, empty or group/world-accessible
  key file disables it (reported), and DB keys keep working.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import keys
from .errors import TooManyCredentials, Unauthorized, Unavailable
from .principals import MASTER, AuthSnapshot, KeyRecord, Principal, principal_for

log = logging.getLogger(__name__)

CACHE_TTL_S = 900.0
CACHE_MAX = 50_000
NEGATIVE_TTL_S = 60.0
NEGATIVE_MAX = 4096


def extract_credential(headers: Mapping[str, str]) -> str:
    """The one bearer token of a request, or TooManyCredentials / Unauthorized.

    `headers` is a CIMultiDict view (getall gives every occurrence, so a duplicated header
    counts twice instead of silently using the first).
    """
    getall = getattr(headers, "getall")
    authorization: list[str] = getall("Authorization", [])
    api_keys: list[str] = getall("x-api-key", [])
    if len(authorization) + len(api_keys) > 1:
        raise TooManyCredentials()
    if api_keys:
        token = api_keys[0].strip()
    elif authorization:
        scheme, _, rest = authorization[0].strip().partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized()
        token = rest.strip()
    else:
        raise Unauthorized()
    if token.split() != [token]:       # empty, or whitespace anywhere in it
        raise Unauthorized()
    return token


# -- master key ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MasterKeyState:
    token: str | None
    problem: str | None          # why the master key is disabled, for logs and status


def read_master_key(path: str) -> MasterKeyState:
    """Read and vet the master key file (blocking; call it in a thread from the loop)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return MasterKeyState(None, f"master key file {path} is missing")
    except OSError as exc:
        return MasterKeyState(None, f"master key file {path} cannot be read: {exc.strerror}")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return MasterKeyState(None, f"master key file {path} is not a regular file")
        if info.st_mode & 0o077:
            return MasterKeyState(None, f"master key file {path} is accessible by group or others "
                                        f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return MasterKeyState(None, f"master key file {path} is not ASCII")
    if not token:
        return MasterKeyState(None, f"master key file {path} is empty")
    if len(token) < 16 or any(ch.isspace() or not ch.isprintable() for ch in token):
        return MasterKeyState(None, f"master key file {path} does not hold a valid key")
    return MasterKeyState(token, None)


def _file_signature(path: str) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid)


class MasterKey:
    """The master key, re-read whenever the file changes (polled; rotation needs no restart)."""

    def __init__(self, path: str):
        self.path = path
        self.state = MasterKeyState(None, "master key not loaded yet")
        self._signature: tuple[int, ...] | None = ()

    async def refresh(self) -> None:
        """Re-read the file if its inode, size, mtime or mode changed."""
        signature = await asyncio.to_thread(_file_signature, self.path)
        if signature == self._signature:
            return
        state = await asyncio.to_thread(read_master_key, self.path)
        self._signature = signature
        if state.problem != self.state.problem or state.token != self.state.token:
            if state.problem:
                log.warning("master key disabled: %s", state.problem)
            else:
                log.info("master key loaded from %s", self.path)
        self.state = state

    def matches(self, token: str) -> bool:
        expected = self.state.token
        if expected is None:
            return False
        return hmac.compare_digest(token.encode(), expected.encode())


# -- DB keys -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Verified:
    key_id: str
    hash: str
    at: float
    principal: Principal        # built once per verified record, reused by every request


class KeyVerifier:
    """Verifies DB keys against the current AuthSnapshot, paying Argon2 once per key."""

    def __init__(self, *, monotonic: Callable[[], float], wall: Callable[[], float],
                 verify: Callable[[str, str], bool] = keys.verify_key, concurrency: int = 2,
                 stale_after_s: float = 5.0, poll_clock: Callable[[], float] = time.monotonic):
        self.snapshot = AuthSnapshot()
        self.snapshot_at: float | None = None      # monotonic time of the last good refresh
        self._monotonic = monotonic
        self._wall = wall
        self._verify = verify
        self._slots = asyncio.Semaphore(concurrency)
        # Its own threads: each verify allocates 19 MiB, and glibc keeps a thread's arena
        # after it; in asyncio's default pool (cores + 4 threads) a flood of wrong secrets
        # left about 77 MiB behind. Two threads keep at most two arenas.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="argon2")
        self._stale_after_s = stale_after_s
        # Freshness is judged on the clock the refresh loop really runs on (real time),
        # not the injected one, so a test moving time cannot fake an outage.
        self._poll_clock = poll_clock
        self._mac = hmac.new(os.urandom(32), digestmod=hashlib.sha256)
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        self._failed: OrderedDict[bytes, float] = OrderedDict()
        self.verifications = 0    # Argon2 verifies run (issue: a key pays once)
        self._in_flight: dict[tuple[bytes, str], asyncio.Task[bool]] = {}

    def close(self) -> None:
        """Stop the Argon2 threads (a verification still running finishes on its own)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def install(self, snapshot: AuthSnapshot) -> None:
        """Swap in a freshly loaded snapshot; cache entries are re-validated lazily."""
        self.snapshot = snapshot
        self.snapshot_at = self._poll_clock()
        # A change can turn a previously failing token into a valid one (rotation back,
        # new key): forget negative results.
        self._failed.clear()

    def mark_fresh(self) -> None:
        """The revision was checked and is unchanged: the snapshot is still current."""
        self.snapshot_at = self._poll_clock()

    def is_fresh(self) -> bool:
        return self.snapshot_at is not None and \
            self._poll_clock() - self.snapshot_at <= self._stale_after_s

    def known(self, token: str) -> Principal | None:
        """The principal of a key verified before (no Argon2, no await), None when the
        token needs a verification; raises as authenticate() does for every refusal
        that needs none. The request path tries this first."""
        found = self._lookup(token)
        return found if isinstance(found, Principal) else None

    async def authenticate(self, token: str,
                           on_verify: Callable[[], None] | None = None) -> Principal:
        """Principal for a DB key, or Unauthorized; Unavailable when the snapshot is stale.
        `on_verify` is called when this request starts an Argon2 verification (not when it
        joins one already running): the pipeline counts it against the client's address
        in advance."""
        found = self._lookup(token)
        if isinstance(found, Principal):
            return found
        record, digest, now = found
        if not await self._verify_once(digest, record, token, on_verify):
            self._remember_failure(digest, now)
            raise Unauthorized()
        principal = principal_for(record)
        self._cache[digest] = _Verified(record.key_id, record.hash, now, principal)
        if len(self._cache) > CACHE_MAX:
            self._cache.popitem(last=False)
        return principal

    def _lookup(self, token: str) -> Principal | tuple[KeyRecord, bytes, float]:
        """Everything short of Argon2: a refusal, the cached principal, or what a
        verification needs (the record, the token's digest, the time)."""
        key_id = keys.key_id(token)
        if key_id is None:
            raise Unauthorized()
        if not self.is_fresh():
            # Fail closed: we can no longer see revocations committed by the CLI.
            raise Unavailable("key store unavailable")
        record = self.snapshot.keys.get(key_id)
        if record is None or not record.usable(self._wall()):
            raise Unauthorized()
        mac = self._mac.copy()      # the keyed state, computed once (SPEC §2: an HMAC)
        mac.update(token.encode())
        digest = mac.digest()
        now = self._monotonic()
        hit = self._cache.get(digest)
        if hit is not None:
            if hit.key_id == key_id and hit.hash == record.hash and now - hit.at < CACHE_TTL_S:
                if hit.principal.record is record:
                    return hit.principal
                # The snapshot was reloaded: same key, new record (limits may differ).
                principal = principal_for(record)
                self._cache[digest] = _Verified(key_id, record.hash, hit.at, principal)
                return principal
            del self._cache[digest]
        failed_at = self._failed.get(digest)
        if failed_at is not None and now - failed_at < NEGATIVE_TTL_S:
            raise Unauthorized()
        return record, digest, now

    async def _verify_once(self, digest: bytes, record: KeyRecord, token: str,
                           on_start: Callable[[], None] | None = None) -> bool:
        """Verify, sharing one Argon2 run among concurrent requests with the same token
        (a client opening 16 connections at once pays once, not 16 times). The run is its
        own task, so the request that started it may be cancelled without failing the rest."""
        flight = (digest, record.hash)
        task = self._in_flight.get(flight)
        if task is None:
            if on_start is not None:
                on_start()
            task = asyncio.get_running_loop().create_task(self._verify_in_thread(record, token))
            self._in_flight[flight] = task
            task.add_done_callback(lambda _t: self._in_flight.pop(flight, None))
        return await asyncio.shield(task)

    async def _verify_in_thread(self, record: KeyRecord, token: str) -> bool:
        async with self._slots:
            self.verifications += 1
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, self._verify, record.hash, token)

    def _remember_failure(self, digest: bytes, now: float) -> None:
        self._failed[digest] = now
        if len(self._failed) > NEGATIVE_MAX:
            self._failed.popitem(last=False)


class Authenticator:
    """Master key first, then DB keys; the one entry point of the pipeline."""

    def __init__(self, master: MasterKey, verifier: KeyVerifier):
        self.master = master
        self.verifier = verifier

    def known(self, headers: Mapping[str, str]) -> Principal | None:
        """The master key or a key verified before, without an await; None when the key
        needs an Argon2 verification (then call authenticate()). Refusals raise."""
        token = extract_credential(headers)
        if self.master.matches(token):
            return MASTER
        return self.verifier.known(token)

    async def authenticate(self, headers: Mapping[str, str],
                           on_verify: Callable[[], None] | None = None) -> Principal:
        token = extract_credential(headers)
        if self.master.matches(token):
            return MASTER
        return await self.verifier.authenticate(token, on_verify)
