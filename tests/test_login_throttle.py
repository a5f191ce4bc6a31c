"""Sign-in throttling and bounded password hashing: 429 + Retry-After per account and per client
address, a lockout an administrator lifts, the same answer and the same work for an unknown
account and a wrong password, at most 4 hashes at once -- and the orchestrator's memory under
a flood of 32 concurrent sign-ins, measured on a real orchestrator process."""

from __future__ import annotations

import os
import sys
import threading
from functools import partial

import httpx
import pytest
import trio
from argon2 import PasswordHasher, extract_parameters

from marathon.bus.throttle import MemoryThrottle
from marathon.errors import AuthError, RateLimited
from marathon.orchestrator import auth
from marathon.orchestrator.auth import HASH_CONCURRENCY, Accounts, LoginLimits
from marathon.store import open_store
from tests.harness import marathon_config, run_marathon, scratch_dir
from tests.polling import until
from tests.servers import free_port

PASSWORD = "correct horse battery"


async def post(c: httpx.AsyncClient, path: str, email: str, password: str) -> httpx.Response:
    return await c.post(path, json={"email": email, "password": password})


@pytest.mark.slow
async def test_twenty_wrong_passwords_give_429s_and_an_administrator_lifts_the_lockout():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), allow_registration=True)
    async with (
        run_marathon(config, role="orchestrator") as mt,
        httpx.AsyncClient(base_url=mt.url, trust_env=False, timeout=60) as anon,
    ):
        assert (await post(anon, "/v1/auth/register", "alice@example.com", PASSWORD)).status_code == 201
        known = [await post(anon, "/v1/auth/login", "alice@example.com", "wrong password") for _ in range(20)]
        unknown = [await post(anon, "/v1/auth/login", "nobody@example.com", "wrong password") for _ in range(20)]
        for answers in (known, unknown):
            assert [r.status_code for r in answers] == [401] * 5 + [429] * 15
            assert all(int(r.headers["retry-after"]) >= 1 for r in answers[5:])
        # an unknown account and a wrong password: the same answers, word for word
        assert [r.json() for r in known[:5]] == [r.json() for r in unknown[:5]]
        assert known[5].json()["error"]["message"].startswith("too many failed sign-ins; try again in")
        assert [r.json()["error"]["code"] for r in known[5:]] == [r.json()["error"]["code"] for r in unknown[5:]]
        # the right password does not get through a lockout...
        r = await post(anon, "/v1/auth/login", "alice@example.com", PASSWORD)
        assert r.status_code == 429
        # ...until an administrator lifts it
        await mt.info.accounts.lift_lockout(email="Alice@Example.com")
        assert (await post(anon, "/v1/auth/login", "alice@example.com", PASSWORD)).status_code == 200
        # per client address: 10 failures so far from here; 10 more on other accounts block every account
        for i in range(10):
            assert (await post(anon, "/v1/auth/login", f"u{i}@example.com", "nope nope")).status_code == 401
        r = await post(anon, "/v1/auth/login", "alice@example.com", PASSWORD)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        await mt.info.accounts.lift_lockout(client="127.0.0.1")
        assert (await post(anon, "/v1/auth/login", "alice@example.com", PASSWORD)).status_code == 200


async def test_registration_attempts_are_throttled_per_client_address():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), allow_registration=True, register_attempts=3)
    async with run_marathon(config, role="orchestrator") as mt:
        async with httpx.AsyncClient(base_url=mt.url, trust_env=False, timeout=60) as anon:
            codes = [
                (
                    await post(anon, "/v1/auth/register", f"r{i}@example.com", "short" if i == 1 else PASSWORD)
                ).status_code
                for i in range(5)
            ]
            assert codes == [201, 400, 201, 429, 429]  # failed attempts count too
        # an administrator registering users is not throttled
        r = await mt.client.post("/v1/auth/register", json={"email": "by-admin@example.com", "password": PASSWORD})
        assert r.status_code == 201


# ---------------------------------------------------------------- the Accounts core


@pytest.fixture
async def store(tmp_path):
    s = await open_store(f"sqlite://{tmp_path / 'a.db'}", str(tmp_path))
    yield s
    await s.close()


class CountingHasher(PasswordHasher):
    """The real argon2id hasher, counting verifications and the most running at once."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.verifies = 0
        self.running = 0
        self.most = 0

    def verify(self, hash, password):
        with self.lock:
            self.verifies += 1
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return super().verify(hash, password)
        finally:
            with self.lock:
                self.running -= 1


async def test_unknown_and_wrong_do_the_same_work(store, monkeypatch):
    hasher = CountingHasher()
    monkeypatch.setattr(auth, "_hasher", hasher)
    accounts = Accounts(store, session_ttl=60)
    user = await accounts.register("bob@example.com", PASSWORD)
    # the dummy hash has the parameters of a real one: verifying it costs the same
    assert extract_parameters(auth._DUMMY_HASH) == extract_parameters(user.password_hash)
    answers = []
    for email in ("bob@example.com", "ghost@example.com"):
        before = hasher.verifies
        with pytest.raises(AuthError) as caught:
            await accounts.login(email, "wrong password", client="10.0.0.1")
        answers.append((str(caught.value), hasher.verifies - before))
    assert answers == [(auth.BAD_LOGIN, 1), (auth.BAD_LOGIN, 1)]


@pytest.mark.slow
async def test_at_most_four_hashes_at_once_and_a_blocked_key_costs_no_hash(store, monkeypatch):
    hasher = CountingHasher()
    monkeypatch.setattr(auth, "_hasher", hasher)
    now = [1000.0]
    limits = LoginLimits(account_failures=3, client_failures=1000, window=60)
    accounts = Accounts(store, session_ttl=60, throttle=MemoryThrottle(clock=lambda: now[0]), limits=limits)
    await accounts.register("carol@example.com", PASSWORD)

    async def attempt(i: int) -> None:
        with pytest.raises(AuthError):
            await accounts.login(f"flood{i}@example.com", "wrong password", client="10.0.0.2")

    async with trio.open_nursery() as n:
        for i in range(32):
            n.start_soon(attempt, i)
    assert hasher.verifies == 32 and hasher.most == HASH_CONCURRENCY == 4

    for _ in range(3):
        with pytest.raises(AuthError):
            await accounts.login("carol@example.com", "wrong password")
    before = hasher.verifies
    with pytest.raises(RateLimited) as blocked:
        await accounts.login("carol@example.com", PASSWORD)
    assert hasher.verifies == before and 0 < blocked.value.retry_after <= 60
    now[0] += 61  # the window has passed: the account may try again
    token, _, user = await accounts.login("carol@example.com", PASSWORD)
    assert token.startswith("ms_") and user.email == "carol@example.com"


# ---------------------------------------------------------------- memory, on a real process

RSS_BOUND = 512 * 1024 * 1024  # peak RSS under the flood: see test docstring


def rss(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(field)


async def login_flood(url: str, n: int = 32) -> list[int]:
    codes: list[int] = []
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=120) as c:

        async def one(i: int) -> None:
            codes.append((await post(c, "/v1/auth/login", f"flood{i}@example.com", "wrong password")).status_code)

        async with trio.open_nursery() as n_:
            for i in range(n):
                n_.start_soon(one, i)
    return codes


@pytest.mark.slow
async def test_a_flood_of_32_concurrent_sign_ins_keeps_the_orchestrator_small():
    """Bound: the orchestrator idles at well under 128 MiB; hashing adds at most
    HASH_CONCURRENCY x 64 MiB = 256 MiB (argon2id's memory_cost); the rest of a sign-in is a few
    KiB.  So the peak RSS (VmHWM) stays under 512 MiB -- before the limiter, 32 concurrent hashes
    on trio's shared pool of 40 threads took it to ~1.9 GiB."""
    tmp = scratch_dir()
    port = free_port()
    env = {
        **os.environ,
        "MARATHON_DATA_DIR": os.path.join(tmp, "data"),
        "MARATHON_HTTP_LISTEN": f"tcp:127.0.0.1:{port}",
        "MARATHON_GATEWAY_LISTEN": "tcp:127.0.0.1:0",
        "MARATHON_LOG_LEVEL": "warning",
    }
    url = f"http://127.0.0.1:{port}"
    async with trio.open_nursery() as n:
        cmd = [sys.executable, "-m", "marathon", "serve", "--role", "orchestrator"]
        proc = await n.start(partial(trio.run_process, cmd, env=env, cwd=tmp, check=False))
        try:

            async def up() -> bool:
                try:
                    async with httpx.AsyncClient(trust_env=False, timeout=2) as c:
                        return (await c.get(url + "/healthz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await until(up, timeout=60)
            idle = rss(proc.pid)
            codes = await login_flood(url)
            peak = rss(proc.pid, "VmHWM")
            assert sorted(set(codes)) in ([401], [401, 429]), codes  # every one answered; none hung or crashed
            assert codes.count(401) >= 20  # they really were hashed (the per-client limit is 20)
            assert idle < 128 * 1024 * 1024, f"idle RSS {idle / 2**20:.0f} MiB"
            assert peak < RSS_BOUND, f"peak RSS {peak / 2**20:.0f} MiB under the flood (idle {idle / 2**20:.0f} MiB)"
            print(f"orchestrator RSS: idle {idle / 2**20:.0f} MiB, peak under 32 sign-ins {peak / 2**20:.0f} MiB")
        finally:
            proc.terminate()
