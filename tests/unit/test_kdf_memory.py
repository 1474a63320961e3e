"""The derivation's memory: a map of its own, in huge pages where the kernel gives them and populated
before libargon2 fills it; the same keys as OpenSSL's Argon2id whatever the kernel refuses."""

from __future__ import annotations

import base64
import ctypes
import os
import re
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from raksha.domain.errors import VaultCorrupt
from raksha.vault.format import kdf

SALT = b"0123456789abcdef"


def params(memory_kib: int, iterations: int = 2, lanes: int = 2) -> dict[str, object]:
    return {"salt": base64.b64encode(SALT).decode(), "iterations": iterations, "memory_kib": memory_kib,
            "lanes": lanes}


def openssl(passphrase: bytes, memory_kib: int, iterations: int = 2, lanes: int = 2) -> bytes:
    return Argon2id(salt=SALT, length=32, iterations=iterations, lanes=lanes, memory_cost=memory_kib).derive(passphrase)


def test_a_derivation_runs_in_its_own_map_and_gives_the_same_key(monkeypatch: pytest.MonkeyPatch) -> None:
    given: list[int] = []
    allocate = kdf._allocate_in_map
    monkeypatch.setattr(kdf, "_allocate", kdf.ffi.callback(
        "int(uint8_t **, size_t)", lambda memory, size: given.append(size) or allocate(memory, size)))
    assert kdf.derive_argon2(b"pw", params(4096)) == openssl(b"pw", 4096)
    assert given == [4096 * 1024]


def test_memory_that_cannot_be_mapped_is_allocated_by_libargon2(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*args: object, **kwargs: object) -> object:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(kdf.mmap, "mmap", no_memory)
    assert kdf.derive_argon2(b"pw", params(2048)) == openssl(b"pw", 2048)


@pytest.mark.parametrize("memory_kib", [0, -1, 1 << 32])
def test_a_memory_cost_no_map_can_have_is_rejected_by_libargon2(memory_kib: int) -> None:
    with pytest.raises(VaultCorrupt, match="Argon2id parameters rejected"):
        kdf.derive_argon2(b"pw", params(memory_kib))


def test_derivations_in_several_threads_each_run_in_their_own_map() -> None:
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda p=p: keys.append(kdf.derive_argon2(p, params(2048))))
               for p in (b"a", b"b", b"c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(keys) == sorted(openssl(p, 2048) for p in (b"a", b"b", b"c"))


@pytest.mark.parametrize("cores", [1, 2, 3, 16])
def test_lanes_run_in_no_more_threads_than_cores_and_give_the_same_key(
        monkeypatch: pytest.MonkeyPatch, cores: int) -> None:
    monkeypatch.setattr(kdf.os, "cpu_count", lambda: cores)
    assert kdf._threads(4) == min(4, cores)
    assert kdf.derive_argon2(b"pw", params(2048, lanes=4)) == openssl(b"pw", 2048, lanes=4)


def test_advice_the_kernel_refuses_still_gives_a_map_and_the_same_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kdf, "MADV_POPULATE_WRITE", 9999)  # EINVAL, as a kernel before 5.14 answers
    monkeypatch.setattr(kdf.mmap, "MADV_HUGEPAGE", 9998)  # as a kernel without transparent huge pages
    buf = kdf._populated_map(2048 * 1024)
    assert buf is not None and len(buf) == 2048 * 1024
    buf.close()
    assert kdf.derive_argon2(b"pw", params(2048)) == openssl(b"pw", 2048)


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            start, end = (int(x, 16) for x in first.split("-"))
            inside = start <= address < end
        elif inside and first == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def _thp_fallbacks() -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("thp_fault_fallback "):
            return int(line.split()[1])
    return 0


def test_the_derivations_memory_is_populated_in_huge_pages_where_the_kernel_gives_them() -> None:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this kernel")
    if tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2]) < (5, 14):
        pytest.skip("MADV_POPULATE_WRITE came in Linux 5.14")
    fallbacks = _thp_fallbacks()
    buf = kdf._populated_map(64 << 20)
    assert buf is not None
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        if _anon_huge_kib(address) == 0 and _thp_fallbacks() > fallbacks:
            pytest.skip("the kernel had no free huge page to give")
        assert _anon_huge_kib(address) > 0  # populated before libargon2 touches it, in 2 MiB pages
    finally:
        buf.close()
