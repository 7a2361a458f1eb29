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
    Option("http_mux_port", "HTTP/WebSocket port of the cluster-wide multiplexer"),
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
)


def _parser() -> argparse.ArgumentParser:
    defaults = {f.name: f.default for f in fields(Settings)}
    p = argparse.ArgumentParser(
        prog="netstatd",
        description="netstatd node agent: kernel connection events to a live WebSocket stream.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for opt in OPTIONS:
        default = defaults[opt.field]
        flag = "--" + opt.field.replace("_", "-")
        help_ = opt.help + (f" [env {opt.env}]" if opt.env else "")
        if isinstance(default, bool):
            p.add_argument(flag, dest=opt.field, action="store_true", help=help_)
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
        values[opt.field] = value
    if not values["node_name"]:
        values["node_name"] = socket.gethostname()
    for port in ("http_port", "http_mux_port", "dnstap_port", "dnstap_mux_port"):
        if not 0 < values[port] < 65536:
            raise SystemExit(f"netstatd: --{port.replace('_', '-')} must be 1-65535, got {values[port]}")
    return Settings(**values)


def _explicit_flags(argv: Sequence[str] | None) -> list[str]:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    return [a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")]
