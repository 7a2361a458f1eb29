"""Peer programs run inside test namespaces (python3 -c). Each prints 'ready ...' when set up."""

import subprocess
import sys


def start_peer(host, script: str, *args: str) -> tuple[subprocess.Popen, int]:
    """Run a peer script in host's netns; return it and the number it printed when ready."""
    proc = host.popen(sys.executable, "-c", script, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line and line[0] == "ready", f"peer failed to start: {line}"
    return proc, int(line[1])


def close_of(stream, netns: int, *, local_port: int | None = None, remote_port: int | None = None) -> dict:
    """The CLOSE event of the connection in netns with that local or remote port."""
    return stream.wait_for(
        lambda e: (
            e["type"] == "connection.event"
            and e["netns"] == netns
            and (local_port is None or e["localPort"] == local_port)
            and (remote_port is None or e["remotePort"] == remote_port)
            and e["state"] == "CLOSE"
        )
    )


def finish(*procs: subprocess.Popen, check: bool = False, timeout: float = 30) -> None:
    """Close the peers' stdin (their cue to end) and wait for them; check: each must exit 0."""
    for p in procs:
        if p.stdin:
            p.stdin.close()
        code = p.wait(timeout)
        assert not check or code == 0, f"peer {p.args[-1]} exited with {code}"


def stop(*procs: subprocess.Popen, timeout: float = 10) -> None:
    """A test's teardown: close the peers' stdin and wait for them, killing any still running after
    timeout (finish() is for a test that asserts how they ended)."""
    for p in procs:
        if p.stdin:
            p.stdin.close()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


TCP_SERVER = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 0))
s.listen()
print('ready', s.getsockname()[1], flush=True)
c, _ = s.accept()
c.recv(100)
c.sendall(b'pong')
c.recv(100)  # the client closes first
c.close()
s.close()
"""

TCP_CLIENT = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print('ready', c.getsockname()[1], flush=True)
c.sendall(b'ping')
c.recv(100)
time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0)
c.close()
time.sleep(0.3)
"""

# Holds a connection open until stdin closes.
TCP_HOLD_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print('ready', c.getsockname()[1], flush=True)
sys.stdin.read()
"""

TCP_HOLD_SERVER = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.bind((sys.argv[1], 0))
s.listen()
print('ready', s.getsockname()[1], flush=True)
c, _ = s.accept()
sys.stdin.read()
"""

# listen() without bind(): the kernel picks the port.
TCP_LISTEN_EPHEMERAL = """
import socket, sys
s = socket.socket()
s.listen()
print('ready', s.getsockname()[1], flush=True)
sys.stdin.read()
"""

UDP_SERVER = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
print('ready', s.getsockname()[1], flush=True)
for _ in range(int(sys.argv[2])):
    data, peer = s.recvfrom(100)
    s.sendto(b'pong', peer)
sys.stdin.read()
"""

UDP_CONNECTED_CLIENT = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
c = socket.socket(fam, socket.SOCK_DGRAM)
c.connect((sys.argv[1], int(sys.argv[2])))
print('ready', c.getsockname()[1], flush=True)
for _ in range(3):
    c.send(b'ping')
    c.recv(100)
sys.stdin.read()
"""

UDP_SENDTO_CLIENT = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
c = socket.socket(fam, socket.SOCK_DGRAM)
c.sendto(b'ping', (sys.argv[1], int(sys.argv[2])))
print('ready', c.getsockname()[1], flush=True)
c.recvfrom(100)
sys.stdin.read()
"""

# Listens in the parent; a forked worker accepts and serves (a pre-fork server).
TCP_PREFORK_SERVER = """
import os, socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    c, _ = s.accept()
    c.recv(100)
    c.sendall(b'pong')
    c.recv(100)
    c.close()
    os._exit(0)
print('ready', s.getsockname()[1], pid, flush=True)
os.waitpid(pid, 0)
"""

# Half-closes (shutdown(SHUT_WR): its side stays in FIN_WAIT2 while the peer keeps its end open)
# and holds the socket until stdin closes.
TCP_HALF_CLOSE_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print('ready', c.getsockname()[1], flush=True)
c.shutdown(socket.SHUT_WR)
sys.stdin.read()
"""

# Accepts and keeps the connection open (CLOSE_WAIT once the peer half-closes) until a line
# arrives on stdin, then closes it and waits for stdin to close.
TCP_CLOSE_ON_LINE_SERVER = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen()
print('ready', s.getsockname()[1], flush=True)
c, _ = s.accept()
sys.stdin.readline()
c.close()
sys.stdin.read()
"""

# ADDR NEED ANSWER [hold]: reads exactly NEED bytes, answers ANSWER bytes, then closes once the client
# has (with "hold": holds the connection until stdin closes).
TCP_EXCHANGE_SERVER = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(fam)
s.bind((sys.argv[1], 0))
s.listen()
print('ready', s.getsockname()[1], flush=True)
c, _ = s.accept()
need = int(sys.argv[2])
while need:
    need -= len(c.recv(min(need, 65536)))
c.sendall(b'r' * int(sys.argv[3]))
if sys.argv[4:] == ['hold']:
    sys.stdin.read()
else:
    assert c.recv(1) == b''
c.close()
"""

# ADDR PORT SEND NEED [hold]: sends SEND bytes, reads exactly NEED, closes (with "hold": says 'done' and
# holds the connection until stdin closes).
TCP_EXCHANGE_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print('ready', c.getsockname()[1], flush=True)
c.sendall(b's' * int(sys.argv[3]))
need = int(sys.argv[4])
while need:
    need -= len(c.recv(need))
if sys.argv[5:] == ['hold']:
    print('done', flush=True)
    sys.stdin.read()
c.close()
"""

# ADDR PORT: connects; prints its local port, then the error connect() ended with.
TCP_CONNECT = """
import errno, socket, sys
c = socket.socket()
c.bind(('0.0.0.0', 0))
print('ready', c.getsockname()[1], flush=True)
print(errno.errorcode[c.connect_ex((sys.argv[1], int(sys.argv[2])))], flush=True)
"""
