"""TLS contexts whose files are re-read when they change: the HTTP listeners' and the multiplexer's.

A listener keeps one SSLContext for its life (asyncio binds it at listen time), and every upstream of
the multiplexer shares one. Loading a new chain into that same context is what new connections then
get; connections already open keep theirs. A CA file that changes is loaded too (added: a rotated CA
is trusted alongside the old one until a restart).
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Sequence

log = logging.getLogger("netstatd.tls")


def file_stamp(paths: Sequence[str]) -> tuple:
    """What changes when any of the files is replaced: a Secret volume swaps a symlink (new inode),
    cert-manager or an editor rewrites in place (new mtime or size). Missing files stamp as None."""
    stamp = []
    for path in paths:
        try:
            st = os.stat(path)
            stamp.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            stamp.append(None)
    return tuple(stamp)


class TLSFiles:
    """A context and the files it is loaded from: cert_file/key_file (optional on a client), and
    ca_file (the server: client certificates it accepts; the client: the CA it checks servers with)."""

    def __init__(self, context: ssl.SSLContext, cert_file: str = "", key_file: str = "", ca_file: str = "") -> None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context = context
        self.cert_file, self.key_file, self.ca_file = cert_file, key_file, ca_file
        self.files = [f for f in (cert_file, key_file, ca_file) if f]
        self.reloads = {"ok": 0, "failed": 0}
        self._stamp = file_stamp(self.files)
        self._load()  # at start-up an error is fatal: the caller names the flags

    def _load(self) -> None:
        if self.cert_file:
            self.context.load_cert_chain(self.cert_file, self.key_file)
        if self.ca_file:
            self.context.load_verify_locations(self.ca_file)

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed. A half-written pair (cert-manager writes one file,
        then the other) fails, keeps the old chain, and is tried again at the next check."""
        stamp = file_stamp(self.files)
        if stamp == self._stamp:
            return False
        try:
            self._load()
        except (OSError, ssl.SSLError) as e:
            self.reloads["failed"] += 1
            log.warning("TLS files %s changed but cannot be loaded (%s); still using the previous ones", self.files, e)
            return False
        self._stamp = stamp
        self.reloads["ok"] += 1
        log.info("TLS files reloaded: %s", ", ".join(self.files))
        return True


def server_tls(cert_file: str, key_file: str, client_ca_file: str = "") -> TLSFiles:
    """Every HTTP listener's: with client_ca_file, a client certificate is optional, and one that is
    presented must be issued by that CA (the multiplexer's), or the handshake fails."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if client_ca_file:
        context.verify_mode = ssl.CERT_OPTIONAL
    return TLSFiles(context, cert_file, key_file, client_ca_file)


def client_tls(ca_file: str = "", cert_file: str = "", key_file: str = "") -> TLSFiles:
    """The multiplexer's: servers checked against ca_file (the system's CAs if empty), and our own
    client certificate when given."""
    # with a CA of our own, only that CA: the system's would let any public certificate pass as an agent
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT) if ca_file else ssl.create_default_context()
    return TLSFiles(context, cert_file, key_file, ca_file)
