"""ctypes bindings for the part of libbpf (>= 1.0) the loader uses."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("netstatd.libbpf")


class BpfError(RuntimeError):
    """A libbpf call failed; errno says why."""

    def __init__(self, what: str, err: int) -> None:
        self.errno = abs(err)
        super().__init__(f"{what}: {strerror(self.errno)} (errno {self.errno})")


def strerror(err: int) -> str:
    """libbpf's own codes (4000+, e.g. invalid ELF) included."""
    buf = ctypes.create_string_buffer(256)
    if lib.libbpf_strerror(err, buf, len(buf)) == 0:
        return buf.value.decode(errors="replace")
    return os.strerror(err)


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    lib = ctypes.CDLL(name, use_errno=True)
    p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    sigs: dict[str, tuple[type | None, list]] = {
        "bpf_object__open_file": (p, [ctypes.c_char_p, p]),
        "bpf_object__load": (i, [p]),
        "bpf_object__close": (None, [p]),
        "bpf_object__find_program_by_name": (p, [p, ctypes.c_char_p]),
        "bpf_object__find_map_by_name": (p, [p, ctypes.c_char_p]),
        "bpf_object__next_program": (p, [p, p]),
        "bpf_object__next_map": (p, [p, p]),
        "bpf_map__name": (ctypes.c_char_p, [p]),
        "bpf_program__name": (ctypes.c_char_p, [p]),
        "bpf_program__section_name": (ctypes.c_char_p, [p]),
        "bpf_program__set_autoload": (i, [p, ctypes.c_bool]),
        "bpf_program__autoload": (ctypes.c_bool, [p]),
        "bpf_program__fd": (i, [p]),
        "bpf_program__attach": (p, [p]),
        "bpf_program__attach_cgroup": (p, [p, i]),
        "bpf_link__destroy": (i, [p]),
        "bpf_link__fd": (i, [p]),
        "bpf_iter_create": (i, [i]),
        "bpf_map__fd": (i, [p]),
        "bpf_map_create": (i, [i, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, p]),
        "bpf_map__set_max_entries": (i, [p, ctypes.c_uint32]),
        "bpf_map__initial_value": (p, [p, ctypes.POINTER(sz)]),
        "bpf_map_lookup_elem": (i, [i, p, p]),
        "bpf_map_update_elem": (i, [i, p, p, ctypes.c_uint64]),
        "bpf_map_lookup_and_delete_elem": (i, [i, p, p]),
        "bpf_map_delete_elem": (i, [i, p]),
        "libbpf_num_possible_cpus": (i, []),
        "libbpf_set_print": (p, [p]),
        "libbpf_strerror": (i, [i, ctypes.c_char_p, sz]),
    }
    for fn, (res, args) in sigs.items():
        f = getattr(lib, fn)
        f.restype = res
        f.argtypes = args
    return lib


lib = _load()
_libc = ctypes.CDLL(None)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

# libbpf_print_level
LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

# Last lines libbpf printed at WARN level: a failed load explains itself there
# (the verifier log), and the loader quotes them in its one error line.
recent_warnings: list[str] = []


@_PRINT_FN
def _print(level: int, fmt: bytes, args: int) -> int:
    buf = ctypes.create_string_buffer(4096)
    # The va_list is passed through to libc: Python cannot format it.
    _libc.vsnprintf(buf, len(buf), fmt, args)
    text = buf.value.decode(errors="replace").rstrip()
    if level == LIBBPF_WARN:
        recent_warnings.append(text)
        del recent_warnings[:-40]
        log.debug("%s", text)
    elif level == LIBBPF_INFO:
        log.debug("%s", text)
    return 0


lib.libbpf_set_print(ctypes.cast(_print, ctypes.c_void_p))


def check_ptr(ptr: int | None, what: str) -> int:
    if not ptr:
        raise BpfError(what, ctypes.get_errno() or 22)
    return ptr


def check_rc(rc: int, what: str) -> None:
    if rc < 0:
        raise BpfError(what, rc)
