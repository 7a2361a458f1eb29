"""The native helper for short TCP connections (shortconn.c), behind a small Python face.

It is optional: `make setup` builds it, and without it every connection takes the Python fold (at
about 3 times the CPU under connection churn). What it gets and gives is plain data: chunks of ring
records, containers of known cookies, packed connections, and per flush a list of templates made by
the one event builder. It never calls into Python.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container
from dataclasses import dataclass

from ..protocol import TCP_STATE_NAMES
from ..sources.bpf import events as ev

try:
    from . import _shortconn  # built by `make setup` (setup.py)
except ImportError:
    _shortconn = None

AVAILABLE = _shortconn is not None


@dataclass(frozen=True, slots=True)
class ShortRep:
    """A short connection that stands for all of a flush's connections with its template key."""

    last: tuple  # its latest state record, decoded (ev.RECORD positions)
    owner: tuple  # its accept record if it has one, else `last`
    first_old: int  # the old state of its first record (0 when that was the accept)
    accepted: bool
    states: list[str]  # every state it passed through, in order


class ShortConnections:
    """Packs the short connections of each chunk until the flush renders them."""

    def __init__(self) -> None:
        assert _shortconn is not None, "check AVAILABLE first"
        self._carry = b""  # records of new connections still open, split() again with the next chunk

    @staticmethod
    def count_kinds(chunk: bytes, counts: Counter[int]) -> None:
        _shortconn.count_kinds(chunk, counts)

    def split(self, chunk: bytes, known: tuple[Container[int], ...]) -> tuple[bytes, bytes, list[tuple[int, bytes]]]:
        """(records for the fold, packed short connections, (pid, raw comm) of their owners)."""
        rest, packed, owners, self._carry = _shortconn.split(self._carry + chunk, known)
        return rest, packed, owners

    def take_carry(self) -> bytes:
        """The carried records (folded at the flush, or when a seed scan needs every record folded)."""
        carry, self._carry = self._carry, b""
        return carry

    @staticmethod
    def distinct(packed: list[bytes]) -> tuple[list[ShortRep], bytes, list[int]]:
        """The flush's distinct templates: a representative each, the template of each connection, and
        how many connections each template serves."""
        raw_reps, index, uses = _shortconn.distinct(packed)
        unpack, names = ev.RECORD.unpack, TCP_STATE_NAMES
        reps = [
            ShortRep(
                unpack(last),
                unpack(owner),
                first_old,
                bool(accepted),
                [names[s] for s in states],
            )
            for last, owner, first_old, accepted, states in raw_reps
        ]
        return reps, index, uses

    @staticmethod
    def byte_sums(packed: list[bytes], index: bytes, templates: int) -> list[tuple[int, int]]:
        """(sent, received) payload bytes of the connections each template stands for."""
        return _shortconn.byte_sums(packed, index, templates)

    @staticmethod
    def render(packed: list[bytes], index: bytes, templates: list[tuple[bytes, ...]], offset_ns: int) -> list[bytes]:
        """Each connection's event text: its template with its timestamp, ports and cookie written in."""
        return _shortconn.render(packed, index, templates, offset_ns)
