"""Executable memory for emitted machine code (cpu_x86_emit.py), and whether this CPU can run it.

The code is written to an anonymous mapping, which is then made read + execute only (never writable
and executable at once, as hardened kernels require). The mapping lives as long as its
`ExecutableCode`; whoever holds a function address keeps the object.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import platform

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int
_PROT_READ, _PROT_EXEC = 1, 4


@functools.lru_cache(maxsize=None)
def unsupported() -> str | None:
    """Why emitted AVX-512 code cannot run here, or None when it can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"emitted machine code is x86-64 Linux only (this is {platform.system()} {platform.machine()})"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError as e:
        return f"cannot read /proc/cpuinfo to check for AVX-512: {e}"
    if "avx512f" not in flags:
        return "emitted machine code needs AVX-512F, which this CPU does not have"
    return None


class ExecutableCode:
    """`code` in read + execute memory; `address(offset)` is where a function in it starts."""

    def __init__(self, code: bytes):
        why = unsupported()
        if why is not None:
            raise RuntimeError(why)
        size = max(len(code), 1)
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._map.write(code)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        if _libc.mprotect(self._base, size, _PROT_READ | _PROT_EXEC) != 0:
            raise OSError(ctypes.get_errno(), "mprotect of emitted code to read + execute failed")
        self.size = len(code)

    def address(self, offset: int = 0) -> int:
        if not 0 <= offset < max(self.size, 1):
            raise ValueError(f"offset {offset} outside the code ({self.size} bytes)")
        return self._base + offset
