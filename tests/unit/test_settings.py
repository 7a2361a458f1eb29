import pytest

from netstatd.settings import parse


def test_defaults_follow_the_product_description():
    s = parse([], environ={"NODE_NAME": "node-a"})
    assert (s.http_port, s.http_mux_port, s.dnstap_port, s.dnstap_mux_port) == (5280, 6280, 5253, 6253)
    assert (s.log_level, s.node_name, s.fanout_service) == ("info", "node-a", "netstatd-headless")
    assert s.containerd_socket == "/run/containerd/containerd.sock"
    assert not (s.loopback or s.disable_tcp or s.disable_udp)


def test_flags_win_over_environment():
    env = {"NODE_NAME": "from-env", "CONTAINERD_SOCKET": "/x.sock", "FANOUT_SERVICE": "svc"}
    s = parse(["--node-name", "from-flag", "--loopback", "--log-level", "trace", "--http-port", "8080"], environ=env)
    assert (s.node_name, s.containerd_socket, s.fanout_service) == ("from-flag", "/x.sock", "svc")
    assert (s.loopback, s.log_level, s.http_port) == (True, "trace", 8080)


def test_node_name_falls_back_to_hostname():
    import socket

    assert parse([], environ={}).node_name == socket.gethostname()


def test_dns_failed_interval_takes_fractions():
    assert parse([], environ={}).dns_failed_interval == 10.0
    assert parse(["--dns-failed-interval", "2.5"], environ={}).dns_failed_interval == 2.5


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "loud"],
        ["--http-port", "x"],
        ["--http-port", "70000"],
        ["--dns-failed-interval", "0"],
        ["--dns-failed-interval", "nan"],
        ["--dns-failed-interval", "-1"],
    ],
)
def test_bad_flags_exit_with_a_message(argv):
    with pytest.raises(SystemExit) as e:
        parse(argv, environ={})
    assert e.value.code != 0
