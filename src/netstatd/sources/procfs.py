"""Host state from /proc: network namespaces, socket owners, process details.

Every scan tolerates processes exiting under it: /proc changes while we read.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

_SOCKET_PREFIX = "socket:["


def _pids(proc_root: str) -> list[int]:
    """Numeric entries of proc_root, ascending (so 'first seen' means 'lowest pid')."""
    try:
        with os.scandir(proc_root) as it:
            return sorted(int(e.name) for e in it if e.name.isdigit())
    except FileNotFoundError:
        return []


def list_netns(proc_root: str = "/proc", netns_dirs: tuple[str, ...] = ("/run/netns",)) -> dict[int, str]:
    """Every network namespace on the host: inode -> a path that opens it.

    Paths are bind mounts from netns_dirs (as `ip netns add` makes) when there is
    one, since they outlive processes, else /proc/PID/ns/net of the lowest pid in
    it. Includes the caller's own. Processes that vanish mid-scan are skipped.
    Inodes come from os.stat, which follows the ns/net magic link to nsfs.
    """
    # Anything in a netns dir that is not on nsfs (a stale file left after its
    # mount went away) would fail setns: keep only what shares our ns/net device.
    try:
        nsfs_dev: int | None = os.stat(f"{proc_root}/self/ns/net").st_dev
    except OSError:
        nsfs_dev = None
    found: dict[int, str] = {}

    def add(path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:  # gone, or not ours to see
            return
        if (nsfs_dev is None or st.st_dev == nsfs_dev) and st.st_ino not in found:
            found[st.st_ino] = path

    for d in netns_dirs:
        try:
            with os.scandir(d) as it:
                names = sorted(e.name for e in it)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for name in names:
            add(os.path.join(d, name))
    for pid in _pids(proc_root):
        add(f"{proc_root}/{pid}/ns/net")
    # The calling thread may sit in a netns no listed process is in (after setns).
    try:
        own = os.stat(f"{proc_root}/thread-self/ns/net").st_ino
    except OSError:
        own = None
    if own is not None and own not in found:
        add(f"{proc_root}/{os.getpid()}/task/{threading.get_native_id()}/ns/net")
    return found


def socket_owners(proc_root: str = "/proc") -> dict[int, int]:
    """socket inode -> pid, from the 'socket:[INODE]' links in /proc/*/fd/*.

    A socket shared by several processes maps to the lowest pid (usually the
    parent that created it). Processes that exit or cannot be read are skipped.
    """
    owners: dict[int, int] = {}
    readlink = os.readlink
    prefix, plen = _SOCKET_PREFIX, len(_SOCKET_PREFIX)
    for pid in _pids(proc_root):
        try:
            dfd = os.open(f"{proc_root}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:  # FileNotFoundError/ProcessLookupError (exited), PermissionError, ...
            continue
        try:
            # readlink relative to the open dir skips a path walk per fd (~30% faster).
            with os.scandir(dfd) as it:
                for entry in it:
                    try:
                        link = readlink(entry.name, dir_fd=dfd)
                    except OSError:  # fd closed since the listing
                        continue
                    if link.startswith(prefix):
                        inode = int(link[plen:-1])
                        if inode not in owners:
                            owners[inode] = pid
        except OSError:  # the process exited while listed
            continue
        finally:
            os.close(dfd)
    return owners


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    comm: str
    exe: str  # full path of the executable, "" when it could not be read (process gone, kernel thread)
    start_time: int  # field 22 of /proc/PID/stat (clock ticks since boot), 0 if unknown


def parse_stat(text: str) -> tuple[str, int]:
    """(comm, start_time) from the contents of /proc/PID/stat.

    comm is in parentheses and may itself contain spaces and ')', so the fields
    after it start at the LAST ')'.
    """
    close = text.rindex(")")
    comm = text[text.index("(") + 1 : close]
    fields = text[close + 1 :].split()  # fields[0] is field 3 (state)
    return comm, int(fields[22 - 3])


def _read_text(path: str) -> str:
    # Kernel text is bytes; never let an odd comm or path raise.
    with open(path, "rb") as f:
        return f.read().decode(errors="replace")


class ProcessCache:
    """pid -> ProcessInfo, bounded: at most `capacity` entries, least recently used evicted."""

    def __init__(self, proc_root: str = "/proc", capacity: int = 16384) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.proc_root = proc_root
        self.capacity = capacity
        # pid -> (comm the entry was validated against, info). The key comm is the
        # caller's (kernel) comm when given: /proc comm can differ from it (a
        # kworker's carries a workqueue suffix) and must not force a re-read each time.
        self._entries: OrderedDict[int, tuple[str, ProcessInfo]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, pid: int) -> bool:
        return pid in self._entries

    def lookup(self, pid: int, comm: str | None = None) -> ProcessInfo:
        """Info for pid, cached. A comm (as the kernel reported it) that differs
        from the cached one means the pid was reused or exec'd: re-read /proc.
        A process already gone yields ProcessInfo(pid, comm or "", "", 0), cached too."""
        entry = self._entries.get(pid)
        if entry is not None and (comm is None or entry[0] == comm):
            self._entries.move_to_end(pid)
            return entry[1]
        info = self._read(pid, comm)
        self._entries[pid] = (comm if comm is not None else info.comm, info)
        self._entries.move_to_end(pid)
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return info

    def _read(self, pid: int, comm: str | None) -> ProcessInfo:
        base = f"{self.proc_root}/{pid}"
        try:
            proc_comm = _read_text(f"{base}/comm").rstrip("\n")
        except (FileNotFoundError, ProcessLookupError):
            return ProcessInfo(pid, comm or "", "", 0)
        except OSError:
            proc_comm = comm or ""
        try:
            start_time = parse_stat(_read_text(f"{base}/stat"))[1]
        except (OSError, ValueError, IndexError):
            start_time = 0
        try:
            exe = os.readlink(f"{base}/exe")
        except OSError:  # kernel thread (ENOENT), exited, or no permission
            exe = ""
        exe = exe.removesuffix(" (deleted)")
        return ProcessInfo(pid, proc_comm, exe, start_time)
