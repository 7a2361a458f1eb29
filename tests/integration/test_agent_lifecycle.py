"""Start-up failures (one actionable error line and a non-zero exit each), optional hooks, and shutdown."""

import os
import socket
import subprocess

from netstatd.sources.bpf.loader import HERE
from netstatd.testing.agent import AgentProcess, free_port, isolated_args, netstatd_binary
from tests.conftest import require_root

ROOT = HERE.parents[3]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


def test_port_in_use():
    require_root()
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        argv = [netstatd_binary(), "--http-port", str(port), *isolated_args()]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    (line,) = error_lines(r.stderr)
    assert f"port {port} is already in use" in line and "--http-port" in line


def test_not_root():
    require_root()
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            netstatd_binary(),
            "--http-port",
            str(free_port()),
            *isolated_args(),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0
    (line,) = error_lines(r.stderr)
    assert "must run as root" in line and "sudo" in line


def test_a_hook_the_kernel_rejects_names_the_program_and_the_reason(tmp_path):
    require_root()
    obj = tmp_path / "rejected.bpf.o"
    subprocess.run(
        [
            "clang",
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-D__TARGET_ARCH_x86",
            f"-I{HERE}",
            f"-I{ROOT / 'build'}",
            "-c",
            str(ROOT / "tests/fixtures/rejected_hook.bpf.c"),
            "-o",
            str(obj),
        ],
        check=True,
    )
    env = {"NETSTATD_BPF_OBJECT": str(obj)}
    r = subprocess.run(
        [netstatd_binary(), "--http-port", str(free_port()), *isolated_args()],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
    )
    assert r.returncode != 0
    (line,) = error_lines(r.stderr)
    assert "on_post_bind4" in line and "invalid bpf_context access" in line, line


def test_refused_fentry_is_logged_and_the_agent_carries_on(tmp_path):
    require_root()
    with AgentProcess(log_path=tmp_path / "agent.log") as agent:
        log = agent.log_text()
        if agent.metric("netstatd_fentry_available") == 0:
            assert "fentry/fexit programs are refused by this kernel" in log
        assert agent.metric("netstatd_build_info") == 1


def test_stops_promptly_with_a_client_connected(tmp_path):
    import time

    from netstatd.testing.stream import StreamClient

    require_root()
    agent = AgentProcess(log_path=tmp_path / "agent.log").start()
    with StreamClient(agent.ws_url) as stream:
        stream.wait_snapshot()
        t0 = time.monotonic()
        assert agent.stop() == 0
        assert time.monotonic() - t0 < 5
        assert stream.closed.wait(5)  # the client was told, not left hanging


def test_agent_process_starts_on_a_fresh_port_when_its_own_was_taken(tmp_path):
    """AgentProcess (testing/agent.py) retries when the agent exits for a port in use: here its first
    --dnstap-port is held by a socket this test keeps open (tests/unit/test_testing_agent.py has more)."""
    require_root()
    agent = AgentProcess(log_path=tmp_path / "agent.log")
    taken = agent.dnstap_port
    with socket.socket() as thief:
        thief.bind(("0.0.0.0", taken))
        thief.listen()
        with agent:
            assert agent.dnstap_port != taken
            assert agent.metric("netstatd_build_info") == 1
            socket.create_connection(("127.0.0.1", agent.dnstap_port), timeout=5).close()  # the collector is there
