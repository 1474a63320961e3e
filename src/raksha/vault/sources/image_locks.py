"""Whether a disk image is open in QEMU (a running VM, qemu-nbd, qemu-img), by QEMU's own image locks.

QEMU's file driver (``locking=auto``, the default wherever the kernel has OFD locks) marks each
permission it holds on an image with a shared OFD lock on byte 100 + the permission's bit, and each
it will not share with byte 200 + the bit (bit 1 is "write"). A restore written over an image that a
running VM has open would corrupt the VM's disk under it, or, when the file is replaced, leave the VM
writing to the old one; so a writer open on it (byte 101) or a reader that needs it unchanged (byte
201) makes it in use. Only those that lock are seen: a VM started with ``locking=off`` is not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

WRITE_HELD, WRITE_UNSHARED = 101, 201  # QEMU's lock bytes for the "write" permission
_FLOCK = "hhqqi4x"  # struct flock on Linux x86_64 and aarch64: type, whence, start, len, pid
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)


def image_in_use(path: str) -> bool:
    """Whether another process holds QEMU's write lock on ``path`` or refuses to share writing it. False
    when it cannot tell (no such file, a filesystem without byte-range locks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return any(_locked(fd, byte) for byte in (WRITE_HELD, WRITE_UNSHARED))
    finally:
        os.close(fd)


def _locked(fd: int, byte: int) -> bool:
    """Whether a write lock on ``byte`` would conflict with a lock someone holds (F_OFD_GETLK, else F_GETLK)."""
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    for command in (F_OFD_GETLK, fcntl.F_GETLK):
        try:
            reply = fcntl.fcntl(fd, command, query)
        except OSError as exc:
            if exc.errno == errno.EINVAL and command == F_OFD_GETLK:
                continue  # a kernel without OFD locks: QEMU uses POSIX ones there
            return False
        return bool(struct.unpack(_FLOCK, reply)[0] != fcntl.F_UNLCK)
    return False
