"""Prints how many KiB of a block device's page cache are resident.

Used by tests/bench/xapi-argv.sh: it maps the device (without touching
it) and counts the resident pages with mincore(2). Linux drops a block
device's page cache when its last opener closes it, so the caller keeps
the device open while it measures.
"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.lseek(fd, 0, os.SEEK_END)
page = os.sysconf("SC_PAGE_SIZE")
addr = libc.mmap(None, size, 1, 1, fd, 0)
if addr is None or addr == ctypes.c_void_p(-1).value:
    sys.exit("mmap failed")
n = (size + page - 1) // page
vec = ctypes.create_string_buffer(n)
if libc.mincore(addr, size, vec) != 0:
    sys.exit("mincore failed")
print((n - vec.raw.count(0)) * page // 1024)
