"""Session recordings in an S3-compatible object store, against a real S3 server (moto in server
mode, as a subprocess), never a mock of the client.

The module's server enforces authentication: an IAM user with an access key and an s3:* policy is
made while moto still accepts anything, then moto is switched to checking every request (it
recomputes each SigV4 signature with botocore and refuses a mismatch), so a wrong secret is refused
the way AWS refuses it. Signatures are also checked against published AWS examples. Covered: the
client's put/get/head/list (with continuation), errors that name the bucket and key but never the
secret, the uploader (after close, store down then up, keep_local markers, a restart with files
left behind, open files left alone), the CLI reading recordings from the store, and a gateway
writing to the store end to end.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from conftest import GatewayFactory, gateway_config, psql
from ostiary import _core
from ostiary.config import load
from ostiary.devcluster import PgCluster, TlsMaterial, free_port
from ostiary.errors import ConfigError, ObjectStoreError
from ostiary.hooks import SessionInfo
from ostiary.identity import Identity
from ostiary.recording.live import LiveRecordings
from ostiary.recording.objectstore import (
    EMPTY_SHA256,
    ObjectStoreClient,
    Uploader,
    canonical_request,
    list_remote,
    pending_recordings,
    remote_info,
    signature_v4,
)
from ostiary.recording.store import RecordingHeader, RecordingWriter, recording_path

boto3 = pytest.importorskip("boto3", reason="moto[server] (the dev extras) runs the S3 server")
pytest.importorskip("moto")

BUCKET = "ostiary-recordings"


@dataclass
class S3Server:
    url: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen[bytes]

    def client(self, bucket: str = BUCKET, secret: str | None = None, **kw: Any) -> ObjectStoreClient:
        creds = (self.access_key, self.secret_key if secret is None else secret)
        return ObjectStoreClient(self.url, bucket, lambda: creds, **kw)


def start_moto(port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"moto did not start:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    port = free_port()
    proc = start_moto(port, tmp_path_factory.mktemp("moto") / "moto.log")
    url = f"http://127.0.0.1:{port}"
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="ostiary")
        iam.put_user_policy(
            UserName="ostiary",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="ostiary")["AccessKey"]
        # From here on moto authenticates every request and checks its signature.
        reset = urllib.request.Request(
            f"{url}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(reset, timeout=10):
            pass
        server = S3Server(url, key["AccessKeyId"], key["SecretAccessKey"], proc)
        server.client().create_bucket()
        yield server
    finally:
        stop(proc)


# -- signatures ---------------------------------------------------------------------------------------


def test_sigv4_reproduces_the_aws_test_suite_get_vanilla() -> None:
    # The "get-vanilla" case of AWS's Signature Version 4 test suite, with its example credentials.
    request, signed = canonical_request(
        "GET", "/", [], {"Host": "example.amazonaws.com", "X-Amz-Date": "20150830T123600Z"}, EMPTY_SHA256
    )
    assert request == (
        "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert signed == "host;x-amz-date"
    auth = signature_v4(
        method="GET",
        path="/",
        query=[],
        headers={"Host": "example.amazonaws.com", "X-Amz-Date": "20150830T123600Z"},
        payload_hash=EMPTY_SHA256,
        access_key="AKIDEXAMPLE",
        secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        region="us-east-1",
        service="service",
        amz_date="20150830T123600Z",
    )
    assert auth == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, "
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    )


@pytest.mark.parametrize(
    ("path", "query", "extra", "signature"),
    [
        # The S3 documentation's examples: GET Object with a Range, and ListObjects.
        (
            "/test.txt",
            [],
            {"Range": "bytes=0-9"},
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
        ),
        (
            "/",
            [("max-keys", "2"), ("prefix", "J")],
            {},
            "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
        ),
    ],
)
def test_sigv4_reproduces_the_s3_documentation_examples(
    path: str, query: list[tuple[str, str]], extra: dict[str, str], signature: str
) -> None:
    auth = signature_v4(
        method="GET",
        path=path,
        query=query,
        headers={
            "Host": "examplebucket.s3.amazonaws.com",
            "x-amz-content-sha256": EMPTY_SHA256,
            "x-amz-date": "20130524T000000Z",
            **extra,
        },
        payload_hash=EMPTY_SHA256,
        access_key="AKIAIOSFODNN7EXAMPLE",
        secret_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        region="us-east-1",
        service="s3",
        amz_date="20130524T000000Z",
    )
    assert auth.endswith(f"Signature={signature}")


# -- the client ---------------------------------------------------------------------------------------


def test_put_get_head_and_list_with_continuation(s3: S3Server) -> None:
    c = s3.client()
    keys = [f"t/{i:02d}.rec" for i in range(7)] + ["t/odd name+ü=&%.rec", "u/other.rec"]
    for i, key in enumerate(keys):
        c.put(key, f"object {i} ".encode() * 10)
    assert c.get("t/03.rec") == b"object 3 " * 10
    assert c.get("t/odd name+ü=&%.rec").startswith(b"object 7")
    assert c.get("t/03.rec", (0, 5)) == b"object"
    assert c.get("t/03.rec", (-3, None)) == b" 3 "
    info = c.head("t/03.rec")
    assert info is not None and info.size == 90 and info.etag
    assert c.head("t/missing.rec") is None
    # Pages of two keys: four requests with continuation tokens.
    assert c.list("t/", max_keys=2) == sorted(k for k in keys if k.startswith("t/"))
    assert c.list("nothing/") == []
    with pytest.raises(ObjectStoreError) as e:
        c.get("t/missing.rec")
    assert e.value.status == 404 and e.value.code == "NoSuchKey"
    assert f"bucket {BUCKET} key t/missing.rec" in str(e.value) and "HTTP 404 NoSuchKey" in str(e.value)


def test_a_file_is_streamed_and_ranged_reads_work(s3: S3Server, tmp_path: Path) -> None:
    c = s3.client()
    data = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "big").write_bytes(data)
    c.put_file("big/one", tmp_path / "big")
    assert c.get("big/one") == data
    assert c.get("big/one", (-17, None)) == data[-17:]
    assert c.get("big/one", (1000, 1999)) == data[1000:2000]


def test_wrong_credentials_are_a_clear_error_without_the_secret(s3: S3Server) -> None:
    wrong = "not-the-secret-Zq9x"
    with pytest.raises(ObjectStoreError) as e:
        s3.client(secret=wrong).put("x/y.rec", b"data")
    msg = str(e.value)
    assert e.value.status == 403 and e.value.code == "SignatureDoesNotMatch", msg
    assert f"bucket {BUCKET} key x/y.rec" in msg and "PUT failed: HTTP 403 SignatureDoesNotMatch" in msg
    assert wrong not in msg and s3.secret_key not in msg and wrong not in repr(s3.client(secret=wrong))
    unknown = ObjectStoreClient(s3.url, BUCKET, lambda: ("AKIAUNKNOWN000000000", wrong))
    with pytest.raises(ObjectStoreError) as e:
        unknown.list("")
    assert e.value.status == 403 and e.value.code == "InvalidAccessKeyId" and wrong not in str(e.value)
    # The right secret works (so moto did check the signature, not just the key).
    s3.client().put("x/y.rec", b"data")


def test_unreachable_store_and_missing_bucket_are_named(s3: S3Server) -> None:
    down = ObjectStoreClient(f"http://127.0.0.1:{free_port()}", BUCKET, lambda: ("a", "b"), timeout=2)
    with pytest.raises(ObjectStoreError) as e:
        down.get("k")
    assert e.value.status == 0 and "refused" in str(e.value).lower() and f"bucket {BUCKET}" in str(e.value)
    with pytest.raises(ObjectStoreError) as e:
        s3.client("no-such-bucket").put("k", b"")
    assert e.value.code == "NoSuchBucket" and "bucket no-such-bucket" in str(e.value)


# -- the uploader -------------------------------------------------------------------------------------


def closed_recording(data_dir: Path, ref: str, *, close: bool = True) -> Path:
    started = dt.datetime(2024, 5, 17, 12, 0, tzinfo=dt.UTC)
    path = recording_path(data_dir, ref, started)
    w = RecordingWriter(path, RecordingHeader(session_ref=ref, started=started, identity="ci"))
    header_only = path.stat().st_size
    w.close("client closed")
    if not close:
        os.truncate(path, header_only)  # as a crash leaves it: no trailer, and no writer's lock
    return path


async def wait_for(check: Any, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while not await trio.to_thread.run_sync(check):
            await trio.sleep(0.05)


def fresh_prefix() -> str:
    return f"run-{time.monotonic_ns()}/"


def test_a_closed_recording_is_uploaded_and_linked(s3: S3Server, tmp_path: Path) -> None:
    prefix = fresh_prefix()
    client = s3.client()
    uploader = Uploader(tmp_path, client, prefix, keep_local=False)
    live = LiveRecordings(tmp_path, uploader)
    info = SessionInfo(
        id=7,
        identity=Identity("ci", "password", "password", {}),
        connection="app",
        grant="g",
        access="read-only",
        upstream_user="app",
        peer="127.0.0.1:5555",
        client_tls=None,
        upstream_process_id=1,
        started=time.time(),
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(live.run)
            await nursery.start(uploader.run)
            rel = live.start(info, "abc-7")
            local = tmp_path / rel
            await trio.sleep(0.3)
            assert local.exists() and client.list(prefix) == []  # open: stays local
            extra = live.end(7, "client closed")
            key = f"{prefix}{local.parent.name}/abc-7.rec"
            assert extra == {"recording_url": f"s3://{BUCKET}/{key}"}
            await wait_for(lambda: not local.exists())
            assert client.list(prefix) == [key]
            got = remote_info(client, key)
            assert got.header.session_ref == "abc-7" and got.trailer is not None
            assert got.trailer.ended_reason == "client closed" and got.path == extra["recording_url"]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_store_down_then_up_loses_nothing(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client = ObjectStoreClient(url, BUCKET, lambda: ("k", "s"), timeout=2)
    uploader = Uploader(tmp_path, client, "recordings/", keep_local=False)
    uploader.min_backoff, uploader.max_backoff = 0.1, 0.5
    files = [closed_recording(tmp_path, f"down-{i}") for i in range(3)]
    procs: list[subprocess.Popen[bytes]] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(uploader.run)  # finds the three files left there
            await trio.sleep(1.0)
            assert all(f.exists() for f in files) and uploader.uploaded == 0
            procs.append(await trio.to_thread.run_sync(start_moto, port, tmp_path / "moto.log"))
            await trio.sleep(0.5)  # the bucket does not exist yet: NoSuchBucket is retried too
            assert all(f.exists() for f in files)
            await trio.to_thread.run_sync(client.create_bucket)
            await wait_for(lambda: not any(f.exists() for f in files))
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        assert sorted(client.list("recordings/")) == [f"recordings/2024-05-17/down-{i}.rec" for i in range(3)]
        assert uploader.uploaded == 3
        for f in files:
            assert client.get(f"recordings/2024-05-17/{f.name}")[:6] == b"OSTREC"
    finally:
        for p in procs:
            stop(p)


def test_keep_local_marks_and_a_restart_uploads_what_is_left(s3: S3Server, tmp_path: Path) -> None:
    prefix = fresh_prefix()
    client = s3.client()
    done = closed_recording(tmp_path, "left-1")
    cut = closed_recording(tmp_path, "cut-2", close=False)
    started = dt.datetime(2024, 5, 17, 13, 0, tzinfo=dt.UTC)
    open_path = recording_path(tmp_path, "open-3", started)
    writer = RecordingWriter(open_path, RecordingHeader(session_ref="open-3", started=started))
    # A writer's lock keeps a live file out of the queue; a crash's remnant (no lock) is in it.
    assert list(pending_recordings(tmp_path)) == [cut, done]

    async def run_once() -> None:
        uploader = Uploader(tmp_path, client, prefix, keep_local=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(uploader.run)
            await wait_for(lambda: uploader.uploaded == 2)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()

    trio.run(run_once)
    day = f"{prefix}2024-05-17/"
    assert sorted(client.list(prefix)) == [f"{day}cut-2.rec", f"{day}left-1.rec"]
    assert done.exists() and (done.parent / "left-1.rec.uploaded").read_text().strip() == (
        f"s3://{BUCKET}/{day}left-1.rec"
    )
    assert remote_info(client, f"{day}cut-2.rec").trailer is None
    assert list(pending_recordings(tmp_path)) == []  # marked: nothing to do on the next start
    writer.close("client closed")
    assert list(pending_recordings(tmp_path)) == [open_path]


# -- the CLI ------------------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ostiary.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, **(env or {})),
    )


# The smallest policy a configuration file must have besides the object store.
POLICY: dict[str, Any] = {
    "clients": [{"user": "ci", "password_env": "UNUSED"}],
    "connections": [
        {
            "name": "app",
            "upstream": {
                "host": "127.0.0.1",
                "database": "app",
                "user": "app",
                "password_env": "UNUSED",
                "tls": {"mode": "disable"},
            },
        }
    ],
    "grants": [{"name": "g", "identities": ["ci"], "connection": "app", "access": "read-only"}],
}


def store_config(tmp_path: Path, s3: S3Server, prefix: str, **store: Any) -> tuple[Path, dict[str, str]]:
    (tmp_path / "ak").write_text(s3.access_key + "\n")
    cfg = {
        **POLICY,
        "data_dir": str(tmp_path / "state"),
        "audit": {
            "recordings": {
                "object_store": {
                    "url": s3.url,
                    "bucket": BUCKET,
                    "prefix": prefix,
                    "access_key_file": "ak",
                    "secret_key_env": "OSTIARY_TEST_S3_SECRET",
                    **store,
                }
            }
        },
    }
    path = tmp_path / "ostiary.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, {"OSTIARY_TEST_S3_SECRET": s3.secret_key}


def test_cli_replays_and_lists_a_recording_only_in_the_store(
    s3: S3Server, pg: PgCluster, tmp_path: Path
) -> None:
    from test_recording import STATEMENTS, record_psql

    prefix = fresh_prefix()
    cfg, env = store_config(tmp_path, s3, prefix)
    data_dir = tmp_path / "state"
    path = recording_path(data_dir, "9c1d2e3f-4", dt.datetime.now(dt.UTC))
    r = record_psql(pg, STATEMENTS, path, _core.Recorder(1000, 4096, 1 << 20))
    assert r.returncode == 0, r.stderr
    closed_recording(data_dir, "local-only-5")
    local = cli("sessions", "replay", "9c1d2e3f-4", "--config", str(cfg), env=env)
    assert local.returncode == 0, local.stderr
    local_json = cli("sessions", "replay", "9c1d2e3f-4", "--config", str(cfg), "--json", env=env)

    uploader = Uploader(data_dir, s3.client(), prefix, keep_local=False)
    assert uploader.upload(path) and not path.exists()
    remote = cli("sessions", "replay", "9c1d2e3f-4", "--config", str(cfg), env=env)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout and remote.stderr == local.stderr
    remote_json = cli("sessions", "replay", "9c1d2e3f-4", "--config", str(cfg), "--json", env=env)
    assert remote_json.stdout == local_json.stdout
    url = f"s3://{BUCKET}/{prefix}{path.parent.name}/{path.name}"
    by_url = cli("sessions", "replay", url, "--config", str(cfg), env=env)
    assert by_url.returncode == 0 and by_url.stdout == local.stdout

    listed = cli("sessions", "list", "--config", str(cfg), "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {row["session_ref"]: row for row in map(json.loads, listed.stdout.splitlines())}
    assert set(rows) == {"9c1d2e3f-4", "local-only-5"}
    assert rows["9c1d2e3f-4"]["path"] == url and rows["9c1d2e3f-4"]["statements"] == len(STATEMENTS)
    assert rows["9c1d2e3f-4"]["ended_reason"] == "client closed" and rows["9c1d2e3f-4"]["identity"] == "ci"
    assert rows["local-only-5"]["path"].endswith("local-only-5.rec")
    table = cli("sessions", "list", "--config", str(cfg), "--identity", "ci", env=env)
    assert "9c1d2e3f-4" in table.stdout and "local-only-5" in table.stdout
    # Without the configuration only the local copy is known; a missing one names the store.
    assert cli("sessions", "replay", "9c1d2e3f-4", "--data-dir", str(data_dir)).returncode == 1
    missing = cli("sessions", "replay", "nope-1", "--config", str(cfg), env=env)
    assert missing.returncode == 1 and "no recording 'nope-1' in s3://" in missing.stderr
    bad = cli("sessions", "list", "--config", str(cfg), env={"OSTIARY_TEST_S3_SECRET": "wrong-Zq9x"})
    assert bad.returncode == 1 and "SignatureDoesNotMatch" in bad.stderr and "wrong-Zq9x" not in bad.stderr


def test_list_remote_reads_only_the_ends_of_objects(s3: S3Server, tmp_path: Path) -> None:
    prefix = fresh_prefix()
    client = s3.client()
    for i in range(4):
        client.put_file(f"{prefix}2024-05-17/r-{i}.rec", closed_recording(tmp_path, f"r-{i}"))
    client.put(f"{prefix}2024-05-17/junk-8.rec", b"not a recording")
    client.put(f"{prefix}2024-05-17/empty-9.rec", b"")
    infos = list_remote(client, prefix, limit=3, skip={"r-0"})  # junk and empty are skipped
    assert len(infos) == 3 and {i.header.session_ref for i in infos} == {"r-1", "r-2", "r-3"}
    assert list_remote(client, prefix, since=dt.datetime(2024, 5, 18, tzinfo=dt.UTC)) == []


# -- configuration ------------------------------------------------------------------------------------


def test_config_validation(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"

    def problems(store: dict[str, Any]) -> str:
        path.write_text(yaml.safe_dump({**POLICY, "audit": {"recordings": {"object_store": store}}}))
        with pytest.raises(ConfigError) as e:
            load(path)
        return str(e.value)

    base = {"url": "https://s3.us-east-1.amazonaws.com", "bucket": "b-1", "access_key_env": "A"}
    assert "give exactly one of secret_key_env, secret_key_file" in problems(base)
    both = {**base, "secret_key_env": "S", "access_key_file": "f"}
    assert "give exactly one of access_key_env, access_key_file" in problems(both)
    ok = {**base, "secret_key_env": "S"}
    msg = problems({**ok, "url": "ftp://x", "bucket": "Bad_Name", "timeout": 0, "prefix": "/r"})
    for text in ("not an http:// or https:// endpoint", "is not a bucket name", "timeout", "prefix"):
        assert text in msg
    assert "the bucket goes in bucket" in problems({**ok, "url": "https://s3.amazonaws.com/b-1"})
    assert "ca is for https://" in problems({**ok, "url": "http://127.0.0.1:9000", "ca": "ca.pem"})
    assert "path_style: true" in problems({**ok, "bucket": "a.b.c", "path_style": False})
    assert "file c does not exist" in problems({**ok, "ca": "c"})
    (tmp_path / "c").write_text("")
    store_cfg = {**ok, "secret_key_file": None, "ca": "c"}
    path.write_text(yaml.safe_dump({**POLICY, "audit": {"recordings": {"object_store": store_cfg}}}))
    store = load(path).audit.recordings.object_store
    assert store is not None and store.ca == str(tmp_path / "c") and store.prefix == "recordings/"
    assert store.keep_local is False and store.path_style is True and store.region == "us-east-1"


# -- end to end ---------------------------------------------------------------------------------------


def test_gateway_uploads_recordings_and_links_them(
    s3: S3Server,
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = fresh_prefix()
    monkeypatch.setenv("OSTIARY_TEST_S3_SECRET", s3.secret_key)
    (tmp_path / "ak").write_text(s3.access_key)
    cfg = gateway_config(pg, gateway_tls, 0, tmp_path)
    cfg["audit"] = {
        "flush_interval": 0.05,
        "recordings": {
            "object_store": {
                "url": s3.url,
                "bucket": BUCKET,
                "prefix": prefix,
                "access_key_file": str(tmp_path / "ak"),
                "secret_key_env": "OSTIARY_TEST_S3_SECRET",
            }
        },
    }
    gw = gateway_factory(config=cfg)
    shown = psql(gw, "-c", "select 6 * 7 as answer", "-c", "select 'stored' as where_to")
    assert shown.returncode == 0, shown.stderr
    last = psql(gw, "-c", "select 1")  # ends while the gateway stops: uploaded at shutdown or next start
    assert last.returncode == 0, last.stderr
    assert gw.stop() == 0, gw.log()
    client = s3.client()
    keys = client.list(prefix)
    assert len(keys) == 2, gw.log()
    local = list((Path(cfg["data_dir"]) / "recordings").glob("*/*.rec"))
    assert local == []  # keep_local is false: uploaded copies are removed

    found = cli("audit", "search", "--config", str(gw.config_path), "--json", "--kind", "session_end")
    ends = [json.loads(line) for line in found.stdout.splitlines()]
    urls = sorted(r["data"]["recording_url"] for r in ends)
    assert urls == sorted(f"s3://{BUCKET}/{k}" for k in keys)
    first = min(ends, key=lambda r: r["id"])
    replay = cli("sessions", "replay", first["session"], "--config", str(gw.config_path))
    assert replay.returncode == 0, replay.stderr
    for line in shown.stdout.splitlines():
        assert line in replay.stdout
    assert "=> select 6 * 7 as answer" in replay.stdout
