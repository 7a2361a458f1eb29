"""Loads netstatd.bpf.o into the kernel, attaches its programs, reads its counters."""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from ...metrics import Metric, single
from .. import netlink
from . import events
from .libbpf import BpfError, check_ptr, check_rc, lib, recent_warnings

log = logging.getLogger("netstatd.bpf")

HERE = Path(__file__).resolve().parent
# NETSTATD_BPF_OBJECT: load another build of the object (development and tests).
OBJECT_PATH = Path(os.environ.get("NETSTATD_BPF_OBJECT", HERE / "netstatd.bpf.o"))
PROBE_PATH = HERE / "probe_fentry.bpf.o"

ACCEPT_FEXIT = "on_inet_csk_accept_exit"
ACCEPTOR_BY_IO = "an accepted socket's owner is the first process that sends or receives on it"
STATS_ITERATOR = "on_tcp_stats"
TCP_PROGRAMS = ("on_inet_sock_set_state", "on_inet_sock_set_state_nested", STATS_ITERATOR)
# Socket sends and receives: UDP flows, and (without fexit) the process that accepted a TCP socket.
IO_PROGRAMS = ("on_sock_send_length", "on_sock_recv_length")
UDP_PROGRAMS = (
    "on_udp_sendmsg4",
    "on_udp_sendmsg6",
    "on_udp_recvmsg4",
    "on_udp_recvmsg6",
    *IO_PROGRAMS,
    "on_post_bind4",
    "on_post_bind6",
    "on_sock_release",
)


class LoadError(RuntimeError):
    """The kernel side cannot run; the message says what to do."""


@dataclass(frozen=True)
class KernelSettings:
    capture_tcp: bool = True
    capture_udp: bool = True
    include_loopback: bool = False
    udp_refresh_s: float = 5.0
    # Every CPU's ring together (ring_bytes_per_cpu). Their pages count twice in the agent's RSS (the
    # data area is mapped twice). 8 MiB holds ~0.3 s of full churn, 4x the high water measured there
    # (docs/benchmarks.md).
    ring_bytes: int = 8 << 20


MIN_RING_BYTES = 1 << 20
BPF_MAP_TYPE_RINGBUF = 27


def ring_bytes_per_cpu(total: int, cpus: int) -> int:
    """Each CPU's ring: its share of `total`, a power of two (as the kernel requires), at least 1 MiB."""
    share = max(total // max(cpus, 1), MIN_RING_BYTES)
    return 1 << (share.bit_length() - 1)


def find_cgroup2_root(mounts: str = "/proc/mounts") -> str:
    """The unified hierarchy: /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts."""
    with open(mounts) as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return parts[1]
    raise LoadError("no cgroup2 mount found: mount one (mount -t cgroup2 none /sys/fs/cgroup/unified)")


def ensure_tracefs() -> None:
    """Tracepoint attachment needs tracefs for event ids. Nodes usually have it mounted (systemd does);
    otherwise mount it here, with mount(2) itself: a container image need not carry mount(8)."""
    if os.path.exists("/sys/kernel/tracing/events") or os.path.exists("/sys/kernel/debug/tracing/events"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(b"nodev", b"/sys/kernel/tracing", b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise LoadError(
            f"tracefs is not mounted at /sys/kernel/tracing and mounting it failed ({os.strerror(err)}): "
            "mount it on the node (mount -t tracefs nodev /sys/kernel/tracing), or give the agent CAP_SYS_ADMIN"
        )
    log.info("mounted tracefs at /sys/kernel/tracing")


def check_environment(object_path: Path) -> None:
    if os.geteuid() != 0:
        raise LoadError("netstatd must run as root (it loads eBPF programs): run it with sudo")
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        raise LoadError(
            "kernel BTF is missing (/sys/kernel/btf/vmlinux): use a kernel built with CONFIG_DEBUG_INFO_BTF=y"
        )
    if not object_path.exists():
        raise LoadError(f"{object_path} is missing: build it with 'make setup'")


def verifier_reason(warnings: list[str]) -> str:
    """'; prog NAME: <the verifier's last words>' from libbpf's warnings, or ''."""
    for text in reversed(warnings):
        if "BEGIN PROG LOAD LOG" not in text:
            continue
        prog = text.split("prog '", 1)[1].split("'", 1)[0] if "prog '" in text else "?"
        lines = [ln for ln in text.split("-- BEGIN PROG LOAD LOG --", 1)[1].splitlines() if ln.strip()]
        reasons = [ln for ln in lines if not ln.startswith(("processed ", "-- END")) and not ln[:1].isdigit()]
        return f"; prog {prog}: {reasons[-1].strip()}" if reasons else f"; prog {prog} was rejected"
    return ""


def probe_fentry() -> bool:
    """True when this kernel accepts fentry/fexit programs."""
    if not PROBE_PATH.exists():
        return False
    obj = lib.bpf_object__open_file(str(PROBE_PATH).encode(), None)
    if not obj:
        return False
    try:
        return lib.bpf_object__load(obj) == 0
    finally:
        lib.bpf_object__close(obj)


class KernelProbes:
    """The loaded object and its links. Paired open()/close()."""

    def __init__(self, settings: KernelSettings, object_path: Path = OBJECT_PATH) -> None:
        self.settings = settings
        self.object_path = object_path
        self.uses_fexit = False
        self._accept_from_io = False
        self._producers: list[mmap.mmap] = []  # each ring's producer position page
        self._stats_link: int | None = None
        self._obj: int | None = None
        self._links: list[int] = []
        self._cgroup_fd = -1
        self.ring_fds: list[int] = []  # one ring buffer per possible CPU, index = CPU
        self._udp_flows_fd = -1
        self._take_and_delete = True  # bpf_map_lookup_and_delete_elem on an LRU hash (Linux >= 5.14)
        self._cpus = lib.libbpf_num_possible_cpus()  # a ring each; per-CPU counters have a slot each
        self.ring_size = ring_bytes_per_cpu(settings.ring_bytes, self._cpus)

    # -- lifecycle --------------------------------------------------------
    def open(self) -> None:
        check_environment(self.object_path)
        ensure_tracefs()
        cgroup_root = find_cgroup2_root()
        fexit = probe_fentry()
        if not fexit:
            log.info("fentry/fexit programs are refused by this kernel; %s", ACCEPTOR_BY_IO)
        try:
            self._load(use_fexit=fexit)
        except BpfError as e:
            if not fexit:
                raise self._load_error(e) from None
            log.warning("fexit accept program did not load (%s); %s", e, ACCEPTOR_BY_IO)
            self._load(use_fexit=False)
        self.uses_fexit = fexit and self._obj is not None and self._autoload(ACCEPT_FEXIT)
        self._attach_all(cgroup_root)

    def close(self) -> None:
        for link in self._links:
            lib.bpf_link__destroy(link)
        self._links.clear()
        self._stats_link = None
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1
        self._close_rings()
        if self._obj:
            lib.bpf_object__close(self._obj)
            self._obj = None
        self._udp_flows_fd = -1

    def _close_rings(self) -> None:
        for m in self._producers:
            m.close()
        self._producers.clear()
        for fd in self.ring_fds:
            os.close(fd)
        self.ring_fds.clear()

    # -- steps ------------------------------------------------------------
    def _load(self, use_fexit: bool) -> None:
        if self._obj:
            lib.bpf_object__close(self._obj)
        obj = check_ptr(lib.bpf_object__open_file(str(self.object_path).encode(), None), f"open {self.object_path}")
        self._obj = obj
        s = self.settings
        wanted = set()
        if s.capture_tcp:
            wanted.update(TCP_PROGRAMS)
            wanted.update((ACCEPT_FEXIT,) if use_fexit else IO_PROGRAMS)
        if s.capture_udp:
            wanted.update(UDP_PROGRAMS)
        self._accept_from_io = s.capture_tcp and not use_fexit
        for name, prog in self._programs():
            lib.bpf_program__set_autoload(prog, name in wanted)
        rings = check_ptr(lib.bpf_object__find_map_by_name(obj, b"rings"), "find map rings")
        check_rc(lib.bpf_map__set_max_entries(rings, self._cpus), "size the ring array")
        self._write_settings()
        recent_warnings.clear()
        check_rc(lib.bpf_object__load(obj), "load BPF object")
        self._make_rings(lib.bpf_map__fd(rings))
        counters = check_ptr(lib.bpf_object__find_map_by_name(obj, b"counters"), "find map counters")
        self._counters_fd = lib.bpf_map__fd(counters)
        flows = check_ptr(lib.bpf_object__find_map_by_name(obj, b"udp_flows"), "find map udp_flows")
        self._udp_flows_fd = lib.bpf_map__fd(flows)

    def _make_rings(self, rings_fd: int) -> None:
        """A ring buffer in every CPU's slot of the array (the array holds them; our fds map them)."""
        self._close_rings()
        for cpu in range(self._cpus):
            fd = lib.bpf_map_create(BPF_MAP_TYPE_RINGBUF, f"ring_cpu{cpu}".encode(), 0, 0, self.ring_size, None)
            check_rc(fd, f"create the ring buffer of CPU {cpu}")
            self.ring_fds.append(fd)
            key, value = ctypes.c_uint32(cpu), ctypes.c_uint32(fd)
            check_rc(lib.bpf_map_update_elem(rings_fd, ctypes.byref(key), ctypes.byref(value), 0), "add a ring")
            # the producer position: every record is RECORD_SIZE, so it counts the records written
            self._producers.append(mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ, offset=mmap.PAGESIZE))

    def _write_settings(self) -> None:
        m = None
        while True:
            m = lib.bpf_object__next_map(self._obj, m)
            if not m:
                raise LoadError(f"{self.object_path} has no .rodata map: rebuild it with 'make setup'")
            if lib.bpf_map__name(m).endswith(b".rodata"):
                break
        size = ctypes.c_size_t()
        ptr = check_ptr(lib.bpf_map__initial_value(m, ctypes.byref(size)), "read .rodata")
        if size.value < events.SETTINGS.size:
            raise LoadError(".rodata is smaller than struct agent_settings: rebuild with 'make setup'")
        s = self.settings
        # struct agent_settings is the object's only read-only global: offset 0
        # (tests/unit/test_bpf_abi.py checks this against the BTF).
        packed = events.SETTINGS.pack(
            s.capture_tcp, s.capture_udp, s.include_loopback, self._accept_from_io, int(s.udp_refresh_s * 1e9)
        )
        ctypes.memmove(ptr, packed, len(packed))

    def _attach_all(self, cgroup_root: str) -> None:
        self._cgroup_fd = os.open(cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
        for name, prog in self._programs():
            if not lib.bpf_program__autoload(prog):
                continue
            section = lib.bpf_program__section_name(prog).decode()
            if section.startswith("cgroup/"):
                # a link, so several agents (and other tools) coexist on the root
                link = lib.bpf_program__attach_cgroup(prog, self._cgroup_fd)
            else:
                link = lib.bpf_program__attach(prog)
            if not link:
                err = ctypes.get_errno()
                self.close()
                raise LoadError(
                    f"cannot attach {name} ({section}): {os.strerror(err)}; this kernel lacks a hook netstatd needs"
                )
            self._links.append(link)
            if name == STATS_ITERATOR:
                self._stats_link = link
        log.info("attached %d BPF programs (cgroup hooks at %s)", len(self._links), cgroup_root)

    def _programs(self):
        prog = None
        while True:
            prog = lib.bpf_object__next_program(self._obj, prog)
            if not prog:
                return
            yield lib.bpf_program__name(prog).decode(), prog

    def _autoload(self, name: str) -> bool:
        prog = lib.bpf_object__find_program_by_name(self._obj, name.encode())
        return bool(prog and lib.bpf_program__autoload(prog))

    def _load_error(self, e: BpfError) -> LoadError:
        self.close()
        return LoadError(f"loading the BPF programs failed: {e}{verifier_reason(recent_warnings)}")

    # -- reading ----------------------------------------------------------
    def program_misses(self) -> dict[str, int]:
        """Runs the kernel skipped per loaded program (re-entry on one CPU), from fdinfo."""
        out = {}
        if not self._obj:
            return out
        for name, prog in self._programs():
            fd = lib.bpf_program__fd(prog)
            if fd < 0:
                continue
            try:
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("recursion_misses:"):
                            out[name] = int(line.split()[1])
            except OSError:
                continue
        return out

    def skipped_state_events(self, counters: list[int]) -> int:
        """TCP transitions lost to re-entry: those the first program did not take (skipped by the kernel,
        or left to the second) minus those the second took (netstatd.bpf.c, "Two programs")."""
        not_taken = self.program_misses().get("on_inet_sock_set_state", 0) + counters[events.CNT_PASSED]
        return max(0, not_taken - counters[events.CNT_NESTED])

    def metrics(self) -> list[Metric]:
        counters = self.counters() if self.ring_fds else [0] * events.CNT_MAX
        misses = self.program_misses()
        return [
            single(
                "netstatd_kernel_events_emitted_total",
                "counter",
                "Events the kernel programs wrote.",
                counters[events.CNT_EMITTED],
            ),
            single(
                "netstatd_kernel_events_lost_total",
                "counter",
                "Events lost in the kernel: the ring buffer was full.",
                counters[events.CNT_LOST],
            ),
            single(
                "netstatd_kernel_events_skipped_total",
                "counter",
                "TCP transitions neither state program took (the kernel skips a program already running on that CPU).",
                self.skipped_state_events(counters),
            ),
            single(
                "netstatd_kernel_nested_events_total",
                "counter",
                "TCP transitions the second state program took because the first was already running on that CPU.",
                counters[events.CNT_NESTED],
            ),
            single(
                "netstatd_kernel_transitions_inferred_total",
                "counter",
                "TCP transitions no probe of the tracepoint saw, inferred from the socket's next transition.",
                counters[events.CNT_INFERRED],
            ),
            Metric(
                "netstatd_kernel_program_misses_total",
                "counter",
                "Runs the kernel skipped per BPF program because it was already running on that CPU.",
                [({"program": name}, n) for name, n in sorted(misses.items())],
            ),
            single(
                "netstatd_kernel_states_folded_total",
                "counter",
                "TCP transitions the kernel carried in the socket's next record instead of one of their own.",
                counters[events.CNT_FOLDED],
            ),
            single(
                "netstatd_kernel_udp_deduplicated_total",
                "counter",
                "UDP datagrams folded into an already announced flow.",
                counters[events.CNT_UDP_DEDUPED],
            ),
            single(
                "netstatd_ring_buffer_bytes",
                "gauge",
                "Size of the kernel ring buffers, every CPU's together.",
                self.ring_size * len(self.ring_fds),
            ),
            single(
                "netstatd_fentry_available", "gauge", "1 when fexit programs load on this kernel.", int(self.uses_fexit)
            ),
        ]

    def read_tcp_stats(self, netns: dict[int, str]) -> bytes:
        """The stats iterator's records (events.STATS_RECORD) in each network namespace (inode -> a
        path that opens it): the live TCP connections whose counters changed since the previous read.
        An iterator walks the namespace it is created in, so each is created there (a helper thread,
        as sock_diag's sockets are). Blocking: call it in a thread. Empty without TCP capture. A
        namespace gone meanwhile is skipped."""
        if self._stats_link is None:
            return b""
        link_fd = lib.bpf_link__fd(self._stats_link)

        def create() -> int:
            fd = lib.bpf_iter_create(link_fd)
            if fd < 0:
                raise OSError(-fd, f"bpf_iter_create: {os.strerror(-fd)}")
            return fd

        chunks = []
        for inode, path in netlink.each_netns(netns):
            try:
                fd = netlink.call_in_netns(path, create, inode)
            except (FileNotFoundError, ProcessLookupError):
                continue
            try:
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
            finally:
                os.close(fd)
        return b"".join(chunks)

    def take_udp_flow(self, key: tuple[int, bytes, int]) -> tuple[int, int, int, int] | None:
        """A UDP flow's kernel entry, taken out of the map: its totals as records carry them (bytes sent,
        bytes received, and the low 32 bits of datagrams sent and received), or None when there is none.
        For the closes user space decides (Tables: idle, gone, a socket's flows its release did not send):
        the flow's counts up to now, and a later datagram starts a new entry."""
        if self._udp_flows_fd < 0:
            return None
        k = events.UDP_FLOW_KEY.pack(*key)
        kbuf = (ctypes.c_char * len(k)).from_buffer_copy(k)
        vbuf = (ctypes.c_char * events.UDP_FLOW.size)()
        if self._take_and_delete:
            rc = lib.bpf_map_lookup_and_delete_elem(self._udp_flows_fd, kbuf, vbuf)
            if rc in (-errno.EINVAL, -errno.EOPNOTSUPP, -524):  # ENOTSUPP: an older kernel
                self._take_and_delete = False
        if not self._take_and_delete:
            rc = lib.bpf_map_lookup_elem(self._udp_flows_fd, kbuf, vbuf)
            if rc == 0:
                lib.bpf_map_delete_elem(self._udp_flows_fd, kbuf)
        if rc != 0:
            return None
        sent, received, packets_sent, packets_received, _ = events.UDP_FLOW.unpack(bytes(vbuf))
        return sent, received, packets_sent & 0xFFFFFFFF, packets_received & 0xFFFFFFFF

    def counters(self) -> list[int]:
        """Kernel counters (events.CNT_*), summed over CPUs."""
        vals = (ctypes.c_uint64 * self._cpus)()
        out = []
        for i in range(events.CNT_MAX):
            key = ctypes.c_uint32(i)
            if lib.bpf_map_lookup_elem(self._counters_fd, ctypes.byref(key), vals) != 0:
                out.append(0)
            else:
                out.append(sum(vals))
        out[events.CNT_FOLDED] += out[events.CNT_FOLDED_NESTED]  # each state program counts in its own slot
        # not counted by the programs (one map update less per record): the rings' producer positions
        produced = sum(memoryview(m)[:8].cast("Q")[0] for m in self._producers)
        out[events.CNT_EMITTED] = produced // events.RECORD_SIZE
        return out
