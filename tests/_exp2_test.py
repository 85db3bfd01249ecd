import socket, threading, time, struct
from _exp_test import conns
from pgraw import RawConn, startup_message, password_message

def fake(behavior):
    lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(10)
    def run():
        while True:
            try: s, _ = lst.accept()
            except OSError: return
            behavior(s)
    threading.Thread(target=run, daemon=True).start()
    return lst

def client(gw):
    c = RawConn(gw.port); c.start_tls(gw.tls.ca_cert)
    c.send(startup_message({"user":"ci","database":"app"})); c.recv_message(); c.send(password_message("ci-gateway-secret"))
    return c.outcome(5)

def test_close(pg, gateway_factory):
    lst = fake(lambda s: s.close())
    gw = gateway_factory(connections=conns(pg, port=lst.getsockname()[1], tls={"mode":"disable"}))
    print(client(gw).describe()); time.sleep(0.3); print("alive", gw.proc.poll())

def gss(s):
    s.recv(1000); s.sendall(b"R" + struct.pack("!ii", 8, 7)); time.sleep(2); s.close()

def test_gss(pg, gateway_factory):
    lst = fake(gss)
    gw = gateway_factory(connections=conns(pg, port=lst.getsockname()[1], tls={"mode":"disable"}))
    print(client(gw).describe()); time.sleep(0.3); print("alive", gw.proc.poll())
    print(gw.log()[-600:])
