"""procfs readers against fake /proc trees (and the real /proc where inodes must be real)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from netstatd.sources.procfs import ProcessCache, ProcessInfo, list_netns, parse_stat, socket_owners


def stat_line(pid: int, comm: str, start_time: int) -> str:
    # Fields 3..52 after "(comm)"; field 22 is start_time.
    fields = ["S"] + [str(n) for n in range(4, 53)]
    fields[22 - 3] = str(start_time)
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


def make_proc(root: Path, pid: int, comm: str = "proc", exe: str | None = "/usr/bin/proc", start: int = 1000) -> Path:
    d = root / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "stat").write_text(stat_line(pid, comm, start))
    if exe is not None:
        (d / "exe").symlink_to(exe)
    return d


# -- socket_owners -----------------------------------------------------------


def test_socket_owners(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    a = make_proc(proc, 200)
    (a / "fd" / "3").symlink_to("socket:[123]")
    (a / "fd" / "4").symlink_to("pipe:[77]")
    (a / "fd" / "5").symlink_to("/dev/null")
    (a / "fd" / "6").symlink_to("socket:[456]")
    b = make_proc(proc, 100)  # shares socket 123 (e.g. forked parent): lowest pid wins
    (b / "fd" / "9").symlink_to("socket:[123]")
    (proc / "300").mkdir()  # exited: no fd dir left
    (proc / "net").mkdir()  # non-numeric entries are not processes
    (proc / "net" / "fd").mkdir()
    (proc / "net" / "fd" / "1").symlink_to("socket:[999]")
    (proc / "self").symlink_to("200")

    assert socket_owners(str(proc)) == {123: 100, 456: 200}


def test_socket_owners_missing_root(tmp_path: Path) -> None:
    assert socket_owners(str(tmp_path / "nope")) == {}


# -- list_netns --------------------------------------------------------------


def test_list_netns_fake_tree(tmp_path: Path) -> None:
    proc, nsdir = tmp_path / "proc", tmp_path / "netns"
    nsdir.mkdir()
    for pid in (1, 2, 3, 40):
        (proc / str(pid) / "ns").mkdir(parents=True)
    # Fake namespace files: what matters is their inode (os.stat), as with nsfs.
    (proc / "1" / "ns" / "net").write_text("")
    os.link(proc / "1" / "ns" / "net", proc / "2" / "ns" / "net")  # same netns as pid 1
    (proc / "3" / "ns" / "net").write_text("")
    os.link(proc / "3" / "ns" / "net", nsdir / "blue")  # pid 3's netns also has a bind mount
    (nsdir / "red").write_text("")  # a netns with no process in it
    # pid 40 vanished: ns dir without its net file.
    (proc / "self" / "ns").mkdir(parents=True)
    os.link(proc / "1" / "ns" / "net", proc / "self" / "ns" / "net")

    ino = {p: os.stat(p).st_ino for p in (proc / "1/ns/net", proc / "3/ns/net", nsdir / "red")}
    found = list_netns(str(proc), (str(nsdir), str(tmp_path / "missing")))
    assert found == {
        ino[proc / "1/ns/net"]: f"{proc}/1/ns/net",  # lowest pid
        ino[proc / "3/ns/net"]: f"{nsdir}/blue",  # bind mount preferred over /proc/PID
        ino[nsdir / "red"]: f"{nsdir}/red",
    }


def test_list_netns_real_proc_includes_own() -> None:
    found = list_netns()
    own = os.stat("/proc/thread-self/ns/net").st_ino
    assert own in found
    assert os.stat(found[own]).st_ino == own


# -- stat parsing ------------------------------------------------------------


@pytest.mark.parametrize("comm", ["bash", "a) b (c", "x)", "(", "two  spaces", ") ("])
def test_parse_stat_odd_comm(comm: str) -> None:
    assert parse_stat(stat_line(4242, comm, 987654)) == (comm, 987654)


def test_parse_stat_real() -> None:
    comm, start = parse_stat(Path("/proc/self/stat").read_text())
    assert comm == Path("/proc/self/comm").read_text().rstrip("\n")
    assert start > 0


# -- ProcessCache ------------------------------------------------------------


def test_lookup_reads_proc(tmp_path: Path) -> None:
    make_proc(tmp_path, 42, comm="a) b (c", exe="/usr/bin/tool (deleted)", start=5555)
    make_proc(tmp_path, 2, comm="kthreadd", exe=None, start=3)  # kernel thread: no exe link
    cache = ProcessCache(str(tmp_path))
    assert cache.lookup(42) == ProcessInfo(42, "a) b (c", "/usr/bin/tool", 5555)
    assert cache.lookup(2) == ProcessInfo(2, "kthreadd", "", 3)
    assert len(cache) == 2


def test_lookup_gone_process_is_cached(tmp_path: Path) -> None:
    cache = ProcessCache(str(tmp_path))
    assert cache.lookup(7, "ghost") == ProcessInfo(7, "ghost", "", 0)
    assert cache.lookup(8) == ProcessInfo(8, "", "", 0)
    assert len(cache) == 2
    make_proc(tmp_path, 7, comm="ghost", exe="/bin/ghost")
    assert cache.lookup(7, "ghost").exe == ""  # cached: same comm, not re-read
    assert cache.lookup(7) == ProcessInfo(7, "ghost", "", 0)


def test_lookup_refreshes_on_comm_change(tmp_path: Path) -> None:
    d = make_proc(tmp_path, 42, comm="sh", exe="/bin/sh", start=10)
    cache = ProcessCache(str(tmp_path))
    assert cache.lookup(42, "sh").exe == "/bin/sh"
    # exec: same pid, new image. Same comm from the caller -> cached answer.
    (d / "comm").write_text("nginx\n")
    (d / "exe").unlink()
    (d / "exe").symlink_to("/usr/sbin/nginx")
    assert cache.lookup(42, "sh").exe == "/bin/sh"
    assert cache.lookup(42).exe == "/bin/sh"  # no comm given: cached
    # The kernel now reports another comm -> re-read.
    assert cache.lookup(42, "nginx") == ProcessInfo(42, "nginx", "/usr/sbin/nginx", 10)
    assert len(cache) == 1


def test_lookup_kernel_comm_differs_from_proc_comm(tmp_path: Path) -> None:
    # /proc comm of a kworker carries a workqueue suffix the kernel's comm lacks:
    # one re-read, then the caller's comm is what the entry is checked against.
    d = make_proc(tmp_path, 9, comm="kworker/0:1-events", exe=None)
    cache = ProcessCache(str(tmp_path))
    assert cache.lookup(9, "kworker/0:1").comm == "kworker/0:1-events"
    (d / "comm").write_text("changed\n")
    assert cache.lookup(9, "kworker/0:1").comm == "kworker/0:1-events"


def test_lru_eviction(tmp_path: Path) -> None:
    dirs = {pid: make_proc(tmp_path, pid, comm=f"p{pid}") for pid in (1, 2, 3)}
    cache = ProcessCache(str(tmp_path), capacity=2)
    cache.lookup(1)
    cache.lookup(2)
    cache.lookup(1)  # 1 is now the most recently used
    cache.lookup(3)  # evicts 2
    assert len(cache) == 2
    for pid, d in dirs.items():
        (d / "comm").write_text(f"new{pid}\n")
    # Cached entries keep the old comm; the evicted one is read afresh.
    assert cache.lookup(1).comm == "p1"
    assert cache.lookup(3).comm == "p3"
    assert cache.lookup(2).comm == "new2"  # evicts 1 (LRU after the two lookups above)
    assert len(cache) == 2
    assert cache.lookup(3).comm == "p3"
    assert cache.lookup(1).comm == "new1"


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ProcessCache(capacity=0)
