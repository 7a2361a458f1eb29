"""One declarative options table: it produces the flags, the environment variables and --help."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

LOG_LEVELS = ("trace", "debug", "info", "warn", "error")


@dataclass(frozen=True)
class Settings:
    log_level: str = "info"
    http_port: int = 5280
    http_mux_port: int = 6280
    dnstap_port: int = 5253
    dnstap_mux_port: int = 6253
    disable_tcp: bool = False
    disable_udp: bool = False
    loopback: bool = False
    node_name: str = ""
    containerd_socket: str = "/run/containerd/containerd.sock"
    fanout_service: str = "netstatd-headless"
    client_queue_events: int = 200_000
    dns_max_names: int = 100_000
    dns_failed_interval: float = 10.0
    stats_interval: float = 5.0
    metrics_per_namespace: bool = False
    # Access (docs/security.md). Lists are comma-separated on the command line, or the flag repeated.
    listen_address: tuple[str, ...] = ()  # empty: loopback without authentication, every address with it
    auth_token_file: str = ""
    metrics_public: bool = False
    tls_cert_file: str = ""
    tls_key_file: str = ""
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    max_clients_per_address: int = 16
    peer_ca_file: str = ""
    peer_cert_file: str = ""
    peer_key_file: str = ""
    peer_server_name: str = ""  # empty: the fanout service's name
    peer_max_bytes_per_second: int = 256 << 20
    peer_max_rows: int = 1_500_000
    mux_max_bytes: int = 384 << 20  # an agent's in-agent mux shares the agent's memory limit
    dnstap_allow: tuple[str, ...] = ()

    @property
    def authenticated(self) -> bool:
        """Whether every request must prove who it is: a user token, or a peer's client certificate."""
        return bool(self.auth_token_file or self.peer_ca_file)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)


@dataclass(frozen=True)
class Option:
    field: str
    help: str
    flag: bool = True  # exposed as --field-name
    env: str | None = None  # read from this environment variable
    choices: Sequence[str] | None = None


OPTIONS: tuple[Option, ...] = (
    Option("log_level", "log level", choices=LOG_LEVELS),
    Option("http_port", "HTTP/WebSocket port of this node's UI and API"),
    Option("http_mux_port", "HTTP/WebSocket port of the cluster-wide multiplexer (0: none in the agent)"),
    Option("dnstap_port", "DNSTap (Frame Streams over TCP) port for this node's DNS server"),
    Option("dnstap_mux_port", "DNSTap port whose names are shared cluster-wide"),
    Option("disable_tcp", "do not capture TCP"),
    Option("disable_udp", "do not capture UDP"),
    Option("loopback", "include loopback traffic (excluded in the kernel by default)"),
    Option("node_name", "node name on every event (default: hostname)", env="NODE_NAME"),
    Option("containerd_socket", "containerd gRPC socket", env="CONTAINERD_SOCKET"),
    Option("fanout_service", "headless Service whose DNS name lists every agent", env="FANOUT_SERVICE"),
    Option("client_queue_events", "events queued per WebSocket client before it is reset as too slow"),
    Option("dns_max_names", "IP -> hostname entries kept from DNSTap (least recently learned dropped first)"),
    Option("dns_failed_interval", "seconds between two dns.failed events of one DNS client and name"),
    Option("metrics_per_namespace", "bytes per Kubernetes namespace in /metrics (at most 200 namespaces)"),
    Option(
        "stats_interval",
        "seconds between two reads of live TCP connections' counters and of waiting connects (0: only at their close)",
    ),
    Option(
        "listen_address",
        "addresses every HTTP and DNSTap listener binds (default: 127.0.0.1,::1 without authentication, "
        "every address with it)",
    ),
    Option("auth_token_file", "file of user tokens, one per line, optionally name:token; re-read when it changes"),
    Option("metrics_public", "serve /metrics without authentication"),
    Option("tls_cert_file", "certificate (PEM chain) of every HTTP listener: https and wss; re-read when it changes"),
    Option("tls_key_file", "private key of --tls-cert-file"),
    Option("allowed_origins", "origins besides the page's own whose pages may open /netstat (https://host:port)"),
    Option("allowed_hosts", "Host header names besides this node's names and addresses and localhost (*.domain ok)"),
    Option("max_clients_per_address", "WebSocket clients at once from one source address"),
    Option(
        "peer_ca_file",
        "CA of the agents' certificates: the multiplexer checks agents with it, and an agent lets in a client "
        "certificate it issued (needs --tls-cert-file)",
    ),
    Option("peer_cert_file", "client certificate the multiplexer presents to agents"),
    Option("peer_key_file", "private key of --peer-cert-file"),
    Option("peer_server_name", "name the multiplexer checks in agents' certificates (default: the fanout service)"),
    Option("peer_max_bytes_per_second", "live bytes/s an agent may send the mux, 3 s in a row, before it is cut"),
    Option("peer_max_rows", "rows (connections, ports, containers, IPs, names) the multiplexer holds per agent"),
    Option("mux_max_bytes", "bytes of rows (their JSON) the multiplexer holds in all; an agent over its share is cut"),
    Option("dnstap_allow", "CIDRs allowed to send DNSTap besides loopback and this node's addresses"),
)


def _parser() -> argparse.ArgumentParser:
    defaults = {f.name: f.default for f in fields(Settings)}
    p = argparse.ArgumentParser(
        prog="netstatd",
        description="netstatd node agent: kernel connection events to a live WebSocket stream. "
        "`netstatd mux FLAGS` runs the cluster-wide multiplexer alone, unprivileged (docs/multiplexer.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for opt in OPTIONS:
        default = defaults[opt.field]
        flag = "--" + opt.field.replace("_", "-")
        help_ = opt.help + (f" [env {opt.env}]" if opt.env else "")
        if isinstance(default, bool):
            p.add_argument(flag, dest=opt.field, action="store_true", help=help_)
        elif isinstance(default, tuple):
            p.add_argument(flag, dest=opt.field, action="append", type=_items, default=[], help=help_)
        else:
            p.add_argument(flag, dest=opt.field, type=type(default), default=default, choices=opt.choices, help=help_)
    return p


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> Settings:
    """Flags win over environment variables, which win over defaults."""
    args = vars(_parser().parse_args(argv))
    given = set(_explicit_flags(argv))
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        value = args[opt.field]
        if opt.env and opt.field not in given and environ.get(opt.env):
            value = environ[opt.env]
        values[opt.field] = tuple(x for part in value for x in part) if isinstance(value, list) else value
    if not values["node_name"]:
        values["node_name"] = socket.gethostname()
    for port in ("http_port", "http_mux_port", "dnstap_port", "dnstap_mux_port"):
        low = 0 if port == "http_mux_port" else 1  # 0: the agent serves no multiplexer
        if not low <= values[port] < 65536:
            raise SystemExit(f"netstatd: --{port.replace('_', '-')} must be {low}-65535, got {values[port]}")
    for path, other in (("tls_cert_file", "tls_key_file"), ("peer_cert_file", "peer_key_file")):
        if bool(values[path]) != bool(values[other]):
            raise SystemExit(f"netstatd: --{path.replace('_', '-')} and --{other.replace('_', '-')} go together")
    if values["peer_ca_file"] and not values["tls_cert_file"]:
        raise SystemExit(
            "netstatd: --peer-ca-file lets agents in by their client certificates, which needs TLS: "
            "give --tls-cert-file and --tls-key-file too"
        )
    for name in ("max_clients_per_address", "peer_max_bytes_per_second", "peer_max_rows", "mux_max_bytes"):
        if values[name] < 1:
            raise SystemExit(f"netstatd: --{name.replace('_', '-')} must be at least 1, got {values[name]}")
    if not 0 < values["dns_failed_interval"] <= 86400:  # also refuses nan
        interval = values["dns_failed_interval"]
        raise SystemExit(f"netstatd: --dns-failed-interval must be more than 0 and at most 86400 s, got {interval}")
    if not 0 <= values["stats_interval"] <= 86400:
        raise SystemExit(f"netstatd: --stats-interval must be 0 to 86400 s, got {values['stats_interval']}")
    return Settings(**values)


def _items(text: str) -> list[str]:
    """One flag value of a list option: comma-separated items."""
    return [x.strip() for x in text.split(",") if x.strip()]


def _explicit_flags(argv: Sequence[str] | None) -> list[str]:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    return [a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")]
