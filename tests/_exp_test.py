import socket, subprocess, threading, time, struct
import psycopg
from conftest import psql, APP_PASSWORD
from ostiary.devcluster import free_port
from pgraw import RawConn, errors_in

def conns(pg, **up):
    base = {"host": "127.0.0.1", "port": pg.port, "database": "app", "user": "app",
            "password_env": "OSTIARY_TEST_APP_PASSWORD",
            "tls": {"mode": "verify-full", "ca": str(pg.tls.ca_cert), "server_name": "localhost"}}
    base.update(up)
    return [{"name": "app", "upstream": base}]

def test_hang_upstream(pg, gateway_factory):
    lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(10)
    gw = gateway_factory(connections=conns(pg, port=lst.getsockname()[1], connect_timeout=1.0))
    t = time.monotonic()
    with RawConn(gw.port) as c:
        c.start_tls(gw.tls.ca_cert)
        c.send(__import__("pgraw").startup_message({"user":"ci","database":"app"}))
        print(c.recv_message()); c.send(__import__("pgraw").password_message("ci-gateway-secret"))
        o = c.outcome(5); print(o.describe())
    time.sleep(0.5)
    print("alive", gw.proc.poll(), time.monotonic()-t)
    print(gw.log()[-3000:])

def test_big_plain_upstream(pg, gateway_factory):
    gw = gateway_factory(connections=conns(pg, tls={"mode": "disable"}))
    r = psql(gw, "-At", "-c", "select 1"); assert r.returncode == 0
    base = gw.rss_kib(); peak = [base]; stop = threading.Event()
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], gw.rss_kib()); time.sleep(0.05)
    th = threading.Thread(target=sample); th.start()
    t = time.monotonic()
    r = subprocess.run(["psql","-X","-At","-c","select g, repeat('x',100) from generate_series(1,1000000) g"], env=gw.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120)
    stop.set(); th.join()
    print("rc", r.returncode, r.stderr, time.monotonic()-t, base, peak[0])
    print(gw.log()[-1000:])
