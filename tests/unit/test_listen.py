"""Where listeners bind by default, and the warning when the node is exposed without authentication."""

import pytest

from netstatd.listen import exposure, listen_addresses
from netstatd.settings import parse


def settings(*argv: str):
    return parse(list(argv), environ={"NODE_NAME": "node-a"})


def test_without_authentication_the_default_is_loopback_only():
    assert set(listen_addresses(settings())) <= {"127.0.0.1", "::1"}
    assert "127.0.0.1" in listen_addresses(settings())
    assert exposure(settings(), listen_addresses(settings())) is None


def test_with_a_token_file_the_default_is_every_address():
    s = settings("--auth-token-file", "/x")
    assert "0.0.0.0" in listen_addresses(s) and exposure(s, listen_addresses(s)) is None


def test_an_explicit_address_without_authentication_is_allowed_and_said():
    s = settings("--listen-address", "127.0.0.1,10.1.2.3", "--listen-address", "::")
    assert listen_addresses(s) == ["127.0.0.1", "10.1.2.3", "::"]
    warning = exposure(s, listen_addresses(s))
    assert warning is not None and "10.1.2.3, ::" in warning and "without authentication" in warning
    assert "5280" in warning and "6280" in warning and "--auth-token-file" in warning
    assert exposure(settings("--listen-address", "127.0.0.2,::1"), ["127.0.0.2", "::1"]) is None


def test_a_listen_address_that_is_not_an_address_is_an_error():
    with pytest.raises(ValueError, match="not an IP address"):
        listen_addresses(settings("--listen-address", "localhost"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-cert-file", "c"], "go together"),
        (["--peer-key-file", "k"], "go together"),
        (["--peer-ca-file", "ca"], "needs TLS"),
        (["--max-clients-per-address", "0"], "at least 1"),
    ],
)
def test_inconsistent_security_flags_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        settings(*argv)
    assert message in str(e.value)
