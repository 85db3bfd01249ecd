"""Many sessions doing ordinary, abrupt and hostile things at once on one gateway with two data-path
workers: results checked byte for byte, clients that reset the connection in the middle of a large
result or of a message, cancels, upstream backends terminated under their sessions, pipelined
extended queries, TLS and plaintext clients mixed. Afterwards nothing is left behind: every
gateway descriptor and every upstream backend of these sessions is gone, no session ended with
an internal error, and the gateway still serves.

The mix is random but seeded (``OSTIARY_CHAOS_SEED``; the seed is in every failure message), and
``OSTIARY_CHAOS_SECONDS`` sets how long it runs (default 8).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import CLIENT_PASSWORD, CLIENT_USER, GatewayFactory, GatewayProcess
from ostiary.devcluster import PgCluster, TlsMaterial
from pgraw import RawConn, query_message
from test_pg_hostile import gateway_fds
from test_pg_lifecycle import assert_healthy, shaped_config, superuser, upstream_backends, wait_for

THREADS = 12
APP_PREFIX = "chaos-"


def expected_md5(n: int) -> str:
    return hashlib.md5(",".join(str(i) for i in range(1, n + 1)).encode()).hexdigest()


class Chaos:
    def __init__(
        self, gw: GatewayProcess, pg: PgCluster, seed: int, seconds: float, features: bool = False
    ) -> None:
        self.gw = gw
        self.features = features
        self.pg = pg
        self.seed = seed
        self.until = time.monotonic() + seconds
        self.done: Counter[str] = Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        # Set before the gateway is told to stop: failures from then on are expected.
        self.stopping = threading.Event()
        self.cut_short = 0

    # -- the actions -------------------------------------------------------------------------------

    def dsn(self, rng: random.Random, name: str) -> str:
        sslmode = rng.choice(["disable", "verify-full"])
        return self.gw.dsn(sslmode=sslmode, application_name=f"{APP_PREFIX}{name}")

    def verify(self, rng: random.Random) -> None:
        """Results arrive complete and unchanged, simple and extended protocol, pipelined."""
        n = rng.choice([1, 10, 1000, 50_000])
        with psycopg.connect(self.dsn(rng, "verify"), autocommit=True) as conn:
            got = conn.execute(
                "select md5(string_agg(g::text, ',' order by g)) from generate_series(1, %s) g", (n,)
            ).fetchone()
            assert got == (expected_md5(n),), f"md5 of 1..{n}: {got}"
            with conn.pipeline():
                curs = [conn.execute("select %s::int * 3, %s::text", (i, f"v{i}")) for i in range(20)]
            for i, cur in enumerate(curs):
                assert cur.fetchone() == (i * 3, f"v{i}")
            simple = conn.execute("select 1; select 'two'", prepare=False).fetchone()
            assert simple is not None
            # A statement shape the gateway has not seen (in the guarded gateway, a decision).
            k = rng.randrange(1 << 40)
            assert conn.execute(f"select count(*) as c{k} from generate_series(1, 3)").fetchone() == (3,)

    def raw_session(self, rng: random.Random, name: str) -> RawConn:
        c = RawConn(self.gw.port, timeout=10)
        if rng.random() < 0.5:
            c.start_tls(self.gw.tls.ca_cert)
        msgs = c.login(CLIENT_USER, CLIENT_PASSWORD, application_name=f"{APP_PREFIX}{name}")
        assert msgs[-1][0] == b"Z", msgs[-3:]
        return c

    @staticmethod
    def reset(c: RawConn) -> None:
        """Closes with a TCP reset (SO_LINGER 0), not a FIN."""
        raw = c.sock
        if hasattr(raw, "unwrap"):  # an SSLSocket: reset the TCP socket under it
            raw = socket.socket(fileno=os.dup(raw.fileno()))
            c.sock.close()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()

    def reset_mid_result(self, rng: random.Random) -> None:
        c = self.raw_session(rng, "reset-mid-result")
        k = rng.randrange(1 << 40)  # a new shape: the reset may come while it is being decided
        c.send(query_message(f"select g, repeat('x', 500) as r{k} from generate_series(1, 100000) g"))
        want = rng.choice([1, 10_000, 500_000])
        got = 0
        while got < want:
            chunk = c.sock.recv(65536)
            if not chunk:
                raise AssertionError("the gateway closed the connection during the result")
            got += len(chunk)
        self.reset(c)

    def close_mid_message(self, rng: random.Random) -> None:
        c = self.raw_session(rng, "close-mid-message")
        msg = query_message("select 'this message is cut short'")
        c.send(msg[: rng.randrange(1, len(msg))])
        if rng.random() < 0.5:
            self.reset(c)
        else:
            c.close()

    def cancel(self, rng: random.Random) -> None:
        with psycopg.connect(self.dsn(rng, "cancel"), autocommit=True) as conn:

            def cancel() -> None:
                try:
                    conn.cancel()
                except Exception as e:
                    with self.lock:
                        if not self.stopping.is_set():
                            self.failures.append(f"cancel request: {type(e).__name__}: {e}")

            timer = threading.Timer(rng.uniform(0.05, 0.3), cancel)
            timer.start()
            try:
                with pytest.raises(psycopg.errors.QueryCanceled):
                    conn.execute("select pg_sleep(10)")
            finally:
                timer.cancel()
            assert conn.execute("select 'after cancel'").fetchone() == ("after cancel",)

    def terminate_upstream(self, rng: random.Random) -> None:
        with psycopg.connect(self.dsn(rng, "terminate"), autocommit=True) as conn:
            row = conn.execute("select pg_backend_pid()").fetchone()
            assert row is not None
            with superuser(self.pg) as su:
                su.execute("select pg_terminate_backend(%s)", (row[0],))
            with pytest.raises(psycopg.OperationalError):
                for _ in range(50):  # the termination reaches the client at its next statement
                    conn.execute("select 1")
                    time.sleep(0.01)

    def abandon_copy_out(self, rng: random.Random) -> None:
        conn = psycopg.connect(self.dsn(rng, "copy-out"), autocommit=True)
        try:
            with (
                conn.cursor() as cur,
                cur.copy(
                    "copy (select g, repeat('y', 200) from generate_series(1, 200000) g) to stdout"
                ) as copy,
            ):
                for i, _block in enumerate(copy):
                    if i >= rng.randrange(1, 50):
                        break
                conn.pgconn.finish()  # hang up without reading the rest
        except psycopg.Error:
            pass
        finally:
            conn.close()

    def denied(self, rng: random.Random) -> None:
        """A guardrail refuses a statement (a new shape, so the control plane decides it); the
        session goes on."""
        with psycopg.connect(self.dsn(rng, "denied"), autocommit=True) as conn:
            k = rng.randrange(1 << 40)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-chaos-secret"):
                conn.execute(f"select a as c{k} from chaos_secret_t")
            assert conn.execute("select 'still here'").fetchone() == ("still here",)

    def masked(self, rng: random.Random) -> None:
        """Every email in a result is masked, however the rows fall into chunks."""
        n = rng.choice([1, 100, 20_000])
        with psycopg.connect(self.dsn(rng, "masked"), autocommit=True) as conn:
            rows = conn.execute(
                "select g, 'user' || g || '@example.com' as e from generate_series(1, %s) g", (n,)
            ).fetchall()
        assert len(rows) == n
        leaked = [r for r in rows if "@example.com" in r[1]]
        assert not leaked, f"{len(leaked)} of {n} emails unmasked, e.g. {leaked[:2]}"

    # -- the driver --------------------------------------------------------------------------------

    def worker(self, idx: int) -> None:
        rng = random.Random(self.seed * 1000 + idx)
        actions: list[tuple[float, Callable[[random.Random], None]]] = [
            (4, self.verify),
            (2, self.reset_mid_result),
            (2, self.close_mid_message),
            (1, self.cancel),
            (1, self.terminate_upstream),
            (1, self.abandon_copy_out),
        ]
        if self.features:
            actions += [(2, self.denied), (2, self.masked)]
        weights = [w for w, _ in actions]
        while time.monotonic() < self.until and not self.stopping.is_set():
            (_, action) = rng.choices(actions, weights)[0]
            try:
                action(rng)
            except BaseException as e:
                with self.lock:
                    if self.stopping.is_set():
                        self.cut_short += 1
                    else:
                        self.failures.append(f"{action.__name__}: {type(e).__name__}: {e}")
                return
            with self.lock:
                self.done[action.__name__] += 1


def chaos_backends(pg: PgCluster) -> list[tuple[Any, ...]]:
    return upstream_backends(pg, APP_PREFIX + "%")


def chaos_config(
    pg: PgCluster, tls: TlsMaterial, tmp: Path, features: bool, **overrides: Any
) -> dict[str, Any]:
    """Two workers, TLS optional for clients, TLS upstream, the audit trail on (the default).
    With `features`: a guardrail (and a shipped pack) on the grant and email masking."""
    cfg = shaped_config(pg, tls, tmp, client_tls=False, upstream_tls=True, workers=2, **overrides)
    if features:
        cfg["guardrails"] = [
            {"name": "no-chaos-secret", "match": {"relations": ["chaos_secret*"]}, "message": "off limits"}
        ]
        cfg["grants"][0]["guardrails"] = ["no-destructive-ddl", "no-chaos-secret"]
        cfg["masking"] = [{"name": "pii", "detectors": ["email"]}]
        cfg["connections"][0]["masking"] = ["pii"]
    return cfg


@pytest.mark.parametrize("features", [False, True], ids=["plain", "guardrails-masking"])
def test_many_sessions_doing_hostile_things_leave_nothing_behind(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, features: bool
) -> None:
    seed = int(os.environ.get("OSTIARY_CHAOS_SEED") or random.randrange(1 << 30))
    seconds = float(os.environ.get("OSTIARY_CHAOS_SECONDS") or 8)
    gw = gateway_factory(chaos_config(pg, gateway_tls, tmp_path, features))
    assert_healthy(gw)
    fds0 = gateway_fds(gw)
    chaos = Chaos(gw, pg, seed, seconds, features)
    threads = [threading.Thread(target=chaos.worker, args=(i,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    hung = [t.name for t in threads if t.is_alive()]
    where = f"(seed {seed}; OSTIARY_CHAOS_SEED={seed} reproduces the mix)"
    assert not hung, f"{len(hung)} client threads still running {where}\n{gw.log()[-3000:]}"
    assert not chaos.failures, f"{chaos.failures[:5]} {where}\n{gw.log()[-3000:]}"
    # Every kind of action ran, and often enough to have overlapped with the others.
    kinds = {
        "verify",
        "reset_mid_result",
        "close_mid_message",
        "cancel",
        "terminate_upstream",
        "abandon_copy_out",
    }
    if features:
        kinds |= {"denied", "masked"}
    assert set(chaos.done) == kinds, f"{chaos.done} {where}"
    assert sum(chaos.done.values()) >= 5 * THREADS, f"{chaos.done} {where}"

    # Nothing left behind: the upstream backends of these sessions and the gateway's descriptors.
    try:
        wait_for(lambda: not chaos_backends(pg), 20, "the chaos sessions' upstream backends to end")
    except AssertionError as e:
        left = "\n".join(map(str, chaos_backends(pg)))
        raise AssertionError(f"{e} {where}; still there:\n{left}\n{gw.log()[-3000:]}") from None
    wait_for(
        lambda: gateway_fds(gw) <= fds0 + 2, 20, f"the gateway's descriptors to return to {fds0} {where}"
    )
    log = gw.log()
    for bad in ("internal_error", "panicked", "Traceback"):
        assert bad not in log, f"{bad} in the gateway log {where}:\n{log[-3000:]}"
    assert_healthy(gw)
    print(f"chaos seed {seed}: {dict(chaos.done)}")


def test_sigterm_in_the_middle_of_it_all(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path
) -> None:
    """SIGTERM while a dozen sessions do all of the above: the gateway drains, ends what is left
    when the grace period is over, exits 0, and leaves no upstream backend behind."""
    seed = int(os.environ.get("OSTIARY_CHAOS_SEED") or random.randrange(1 << 30))
    grace = 2.0
    gw = gateway_factory(chaos_config(pg, gateway_tls, tmp_path, True, shutdown={"grace": grace}))
    chaos = Chaos(gw, pg, seed, 60, features=True)
    threads = [threading.Thread(target=chaos.worker, args=(i,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    time.sleep(3)
    where = f"(seed {seed})"
    assert not chaos.failures, f"{chaos.failures[:5]} {where}\n{gw.log()[-3000:]}"
    chaos.stopping.set()
    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    code = gw.proc.wait(grace + 10)
    exited = time.monotonic() - t0
    assert code == 0, f"exit {code} {where}\n{gw.log()[-3000:]}"
    assert exited < grace + 5, f"exited {exited:.1f}s after SIGTERM {where}"
    for t in threads:
        t.join(20)
    assert not [t for t in threads if t.is_alive()], f"client threads still running {where}"
    assert not chaos.failures, f"{chaos.failures[:5]} {where}\n{gw.log()[-3000:]}"
    assert sum(chaos.done.values()) >= THREADS, f"{chaos.done} {where}"
    try:
        wait_for(lambda: not chaos_backends(pg), 10, "the upstream backends to end")
    except AssertionError as e:
        left = "\n".join(map(str, chaos_backends(pg)))
        raise AssertionError(f"{e} {where}; still there:\n{left}\n{gw.log()[-3000:]}") from None
    log = gw.log()
    for bad in ("internal_error", "panicked", "Traceback"):
        assert bad not in log, f"{bad} in the gateway log {where}:\n{log[-3000:]}"
