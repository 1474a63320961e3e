"""Shared fixtures: test images, the ``raksha`` CLI as a real subprocess, ready-made vaults.

Everything here works on real files and real processes:

- ``make_image(name, size, seed)`` writes a sparse, VM-like raw image with
  ``bench/imagegen.py`` and returns its path; ``make_changed_copy(src, name,
  fraction, seed)`` copies it with ~fraction of it rewritten and returns
  ``(path, extents)``, the extents also written to ``<name>.json`` for
  ``--changed-extents``.
- ``run_cli(*args, password=..., timeout=...)`` runs ``.venv/bin/raksha`` with
  stdin not a tty and ``RAKSHA_PASSWORD`` set only when ``password`` is given,
  and returns ``(returncode, stdout, stderr)``. ``cli_json`` does the same,
  asserts the exit status and returns the parsed ``--json`` output.
- ``vault`` is a fresh plaintext vault directory (1 MiB chunks) made with
  ``raksha vault init``; ``encrypted_vault`` one encrypted with passphrase
  ``PASSWORD`` (and a cheap 8 MiB Argon2 so tests stay fast).
- ``blake3_file(path)`` hashes a file, for bit-exact comparisons.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import blake3
import pytest
from sqlalchemy.pool import NullPool

REPO = Path(__file__).resolve().parents[1]
RAKSHA = REPO / ".venv" / "bin" / "raksha"
PASSWORD = "correct horse battery staple"
MIB = 1 << 20
K64 = 64 << 10


def random_chunk(seed: int) -> bytes:
    """64 KiB of seeded incompressible bytes: a blob is the chunk plus one byte."""
    return random.Random(seed).randbytes(K64)


def chunk_image(path: Path, chunks: list[bytes | None]) -> Path:
    """A raw image of 64 KiB chunks; None leaves a hole (an all-zero chunk, never stored)."""
    with open(path, "wb") as f:
        f.truncate(len(chunks) * K64)
        for i, data in enumerate(chunks):
            if data is not None:
                f.seek(i * K64)
                f.write(data)
    return path

RunCli = Callable[..., tuple[int, str, str]]


def load_bench(stem: str) -> ModuleType:
    """``bench/<stem>.py`` as module ``bench_<stem>``, with bench/ on the path as when it runs there (its
    modules import each other by name)."""
    name = f"bench_{stem}"
    if name in sys.modules:
        return sys.modules[name]
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{stem}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


imagegen = load_bench("imagegen")


def index_objects(vault: Any) -> dict[str, Any]:
    """Every index object of ``vault`` (a raksha Vault), decoded, by index id: what tests inspect."""
    from raksha.vault.format.index import decode_index

    return {info.key.removeprefix("index/"): decode_index(vault.backend.get(info.key), vault.crypto, what=info.key)
            for info in vault.backend.list("index/")}


def sets_on_disk(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Make every vault look too large for memory: id sets past 4 ids become ``DiskIdSet``s and index
    rows by pack spill in partitions of a few rows. Returns the list of DiskIdSets finished since."""
    import raksha.vault.repository as repository
    from raksha.vault.format import rows_by_pack
    from raksha.vault.format.sorted_ids import DiskIdSet

    monkeypatch.setattr(repository, "IDS_IN_MEMORY", 4)
    monkeypatch.setattr(rows_by_pack, "PARTITION", 4)
    monkeypatch.setattr(rows_by_pack, "BUFFER_BYTES", 2 * 80)
    finished: list[Any] = []
    real_finish = DiskIdSet.finish

    def finish(self: DiskIdSet) -> DiskIdSet:
        finished.append(self)
        return real_finish(self)

    monkeypatch.setattr(DiskIdSet, "finish", finish)
    return finished


def blake3_file(path: str | os.PathLike[str]) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(4 * MIB):
            h.update(block)
    return h.hexdigest()


def cli_env(password: str | None = None, **extra: str) -> dict[str, str]:
    """The environment a CLI run sees: ours, minus any secret, plus ``password`` if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAKSHA_")}
    if password is not None:
        env["RAKSHA_PASSWORD"] = password
    env.update(extra)
    return env


def run_raksha(*args: Any, password: str | None = None, timeout: float = 120,
               env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None) -> tuple[int, str, str]:
    done = subprocess.run(
        [str(RAKSHA), *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(password, **(env or {})),
        cwd=cwd,
    )
    return done.returncode, done.stdout, done.stderr


def error_of(stdout: str) -> dict[str, Any]:
    """The ``{"error": {...}}`` document a failing command prints with --json."""
    doc = json.loads(stdout)
    assert isinstance(doc, dict) and "error" in doc, stdout
    return dict(doc["error"])


@pytest.fixture
def run_cli() -> RunCli:
    return run_raksha


@pytest.fixture
def cli_json() -> Callable[..., Any]:
    """Run a command with --json, assert it exited ``expect`` (0), return its parsed stdout."""

    def run(*args: Any, expect: int = 0, password: str | None = None, timeout: float = 120) -> Any:
        rc, out, err = run_raksha(*args, "--json", password=password, timeout=timeout)
        assert rc == expect, f"raksha {' '.join(map(str, args))} exited {rc}, expected {expect}\n{out}\n{err}"
        assert "Traceback" not in err, err
        return json.loads(out)

    return run


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """``make_image(name, size=16 MiB, seed=1)``: a sparse VM-like raw image in tmp_path."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)

    def make(name: str = "disk.img", size: int = 16 * MIB, seed: int = 1) -> Path:
        path = images / name
        imagegen.generate_image(path, size, seed)
        return path

    return make


@pytest.fixture
def make_changed_copy(tmp_path: Path) -> Callable[..., tuple[Path, list[list[int]]]]:
    """``make_changed_copy(src, name, fraction=0.01, seed=2)`` -> (image, extents); extents go to name.json."""

    def make(src: Path, name: str, fraction: float = 0.01, seed: int = 2) -> tuple[Path, list[list[int]]]:
        dst = src.parent / name
        extents = imagegen.make_changed_copy(src, dst, fraction, seed)
        imagegen.write_extents(dst, extents)
        return dst, extents

    return make


@pytest.fixture
def vault(tmp_path: Path) -> Path:
    """A fresh plaintext vault (1 MiB chunks), made through the CLI."""
    path = tmp_path / "vault"
    rc, _out, err = run_raksha("vault", "init", path, "--json")
    assert rc == 0, err
    return path


@pytest.fixture
def encrypted_vault(tmp_path: Path) -> Path:
    """A fresh encrypted vault; its passphrase is ``PASSWORD``."""
    path = tmp_path / "evault"
    rc, _out, err = run_raksha("vault", "init", path, "--encrypt", "--kdf-memory", "8M", "--json", password=PASSWORD)
    assert rc == 0, err
    return path


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """A directory for restored images."""
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs("24m")`` mounts a real tmpfs of that size (needs root) and unmounts it afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    try:
        yield mount
    finally:
        for mnt in mounted:
            if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], check=False)


class _TraversableTmp:
    """pytest's temporary directories, traversable by other users (o+x, still not listable).

    libvirt runs QEMU as ``libvirt-qemu`` (Debian's default, and the tests keep it), which must reach the
    guests' images in a test's ``tmp_path``; pytest makes every directory there 0700."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory

    def mktemp(self, basename: str, numbered: bool = True) -> Path:
        path = self._factory.mktemp(basename, numbered)
        root = self._factory.getbasetemp().parent  # /tmp/pytest-of-<user>: pytest resets it to 0700
        for d in (path, *path.parents):
            d.chmod(d.stat().st_mode | 0o001)
            if d == root:
                break
        return path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._factory, name)


@pytest.fixture(scope="session")
def tmp_path_factory(tmp_path_factory: pytest.TempPathFactory) -> pytest.TempPathFactory:
    """The built-in, its directories traversable (``_TraversableTmp``); ``tmp_path`` comes from it too."""
    return _TraversableTmp(tmp_path_factory)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def conn() -> Iterator[Any]:
    """A connection to a libvirtd started for the tests (scripts/start-libvirtd.sh)."""
    libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")
    if os.geteuid() != 0:
        pytest.skip("starting libvirtd needs root")
    sys.path.insert(0, str(Path(__file__).parent / "functional"))
    from libvirt_guests import start_libvirtd

    c = libvirt.open(start_libvirtd())
    yield c
    c.close()


# ---------------------------------------------------------------- databases
# ``postgres_server`` / ``mariadb_server``: a real server for the session (scripts/start-*.sh install and
# start it, idempotently; loopback-free unix sockets under /var/tmp/raksha-test-db), as a SQLAlchemy URL.
# ``fresh_database(server_url)`` makes a new empty database on it and drops it afterwards.
# ``empty_db_url`` is an empty database on each backend in turn: SQLite always, PostgreSQL and MariaDB
# in the slow runs. ``raksha_db`` is a raksha.db.Database at the newest schema and without rows, on each
# backend in turn (``migrated_db_url``: one database per backend per session, emptied before each test).

def _start_db_server(script: str) -> str:
    done = subprocess.run([str(REPO / "scripts" / script)], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=900, check=False)
    if done.returncode != 0:
        if os.geteuid() != 0 and "not root" in done.stderr:
            pytest.skip(f"{script}: {done.stderr.strip()}")
        pytest.fail(f"{script} failed (exit {done.returncode}):\n{done.stderr}")
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def postgres_server() -> str:
    return _start_db_server("start-postgres.sh")


@pytest.fixture(scope="session")
def mariadb_server() -> str:
    return _start_db_server("start-mariadb.sh")


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server of ``server_url`` (its URL), dropped when the block ends."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    # Unique across runs, not only within one: a run killed mid-test leaves its database behind, and a
    # later run in a new pid namespace could have the same pid.
    name = f"raksha_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as c:
        c.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        drop = f"DROP DATABASE IF EXISTS {name}" + (" WITH (FORCE)" if url.get_backend_name() == "postgresql" else "")
        with admin.connect() as c:
            c.execute(text(drop))
        admin.dispose()


@pytest.fixture(scope="session")
def fresh_db() -> Callable[[str], contextlib.AbstractContextManager[str]]:
    """:func:`fresh_database` for test modules: ``with fresh_db(postgres_server) as url:``."""
    return fresh_database


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow),
                        pytest.param("mariadb", marks=pytest.mark.slow)])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'raksha.sqlite'}"
        return
    server = request.getfixturevalue("postgres_server" if request.param == "postgresql" else "mariadb_server")
    with fresh_database(server) as url:
        yield url


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow),
                                         pytest.param("mariadb", marks=pytest.mark.slow)])
def migrated_db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database at the newest schema on each backend in turn, made once per session (rows and all)."""
    from raksha.db import migrate

    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'raksha.sqlite'}"
        else:
            server = request.getfixturevalue("postgres_server" if request.param == "postgresql" else "mariadb_server")
            url = stack.enter_context(fresh_database(server))
        migrate.upgrade(url)
        yield url


@pytest.fixture
def raksha_db(migrated_db_url: str) -> Iterator[Any]:
    """A raksha.db.Database at the newest schema with no rows, on each backend in turn."""
    from sqlalchemy import update

    from raksha.db import Database
    from raksha.db.models import BackupJobRun, Base, VmResourceBackup

    db = Database(migrated_db_url)
    with db.begin() as s:  # MySQL checks self-references row by row: cut them first
        s.execute(update(VmResourceBackup).values(vm_resource_backup_backing_id=None))
        s.execute(update(BackupJobRun).values(parent_run_id=None))
        for table in reversed(Base.metadata.sorted_tables):
            s.execute(table.delete())
    yield db
    db.dispose()
