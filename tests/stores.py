"""Real PostgreSQL 15 and Redis 7 servers for tests and benchmarks.

The binaries come from Debian packages extracted by ``tools/install-stores.sh`` (``make deploy-tools``)
into ``build/tools/stores`` (override with ``CBEC_STORES_ROOT``). Each server runs on 127.0.0.1 on a free
ephemeral port, in its own temp dir, with password authentication on TCP:

    with PostgresServer() as pg, RedisServer() as rd:
        psycopg.connect(pg.dsn, password=pg.password)
        redis.Redis.from_url(rd.url, password=rd.password)

Tests get the fixtures from this module (it is not a conftest). In a conftest.py::

    from tests.stores import pg_url, postgres_server, redis_db, redis_server  # noqa: F401

or in a test module, by assignment (importing a name that a test then takes as a parameter trips ruff's
F811)::

    from tests import stores

    postgres_server, pg_url = stores.postgres_server, stores.pg_url

``postgres_server``/``redis_server`` start once per session (a missing install fails the test, pointing
at ``make deploy-tools``); ``pg_url`` is a fresh database per test (kept until the session ends),
``redis_db`` flushes Redis database 0 before the test. ``store_env`` gives the ``CBEC_*`` variables a
service needs for ``CBEC_STATE_BACKEND=shared``.

PostgreSQL refuses to run as root: as root the servers run as uid/gid 10001 (``setpriv``), with
libnss-wrapper supplying a passwd entry when the machine has none for that uid (initdb needs one).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar
from urllib.parse import quote

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STORES_ROOT = REPO_ROOT / "build" / "tools" / "stores"
LIB_DIR = "usr/lib/x86_64-linux-gnu"
PG_BIN_DIR = "usr/lib/postgresql/15/bin"
PG_SHARE_DIR = "usr/share/postgresql/15"

PG_USER = "cbec"
PG_DATABASE = "cbec"
PG_PASSWORD = "cbec-test-pw"
REDIS_PASSWORD = "cbec-test-redis"
SERVER_UID = 10001  # who runs the servers when the tests run as root

# initdb: 1 MB WAL segments keep a fresh cluster small (30 MB) to copy; --no-sync: initdb's own files
# only (the servers run with fsync=on).
_INITDB_OPTIONS = (
    "-U",
    "postgres",
    "--auth=trust",
    "--encoding=UTF8",
    "--locale=C",
    "--no-sync",
    "--wal-segsize=1",
)
_PG_HBA = "# written by tests/stores.py\nlocal all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
_TEMPLATE_VERSION = 1  # bump when the bootstrap changes in a way the recipe key does not see
_PG_TEMPLATES: dict[str, Path] = {}
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class StoresMissing(RuntimeError):
    """The PostgreSQL/Redis binaries are not installed."""


def stores_root() -> Path:
    """Root of the extracted Debian packages: ``$CBEC_STORES_ROOT`` or ``build/tools/stores``."""
    env = os.environ.get("CBEC_STORES_ROOT")
    return Path(env).resolve() if env else DEFAULT_STORES_ROOT


def require_stores(root: Path | None = None) -> Path:
    """The stores root, checked to hold the binaries; raises ``StoresMissing`` naming the fix."""
    root = root or stores_root()
    needed = [root / PG_BIN_DIR / b for b in ("initdb", "postgres")] + [root / "usr/bin/redis-server"]
    missing = [str(p) for p in needed if not os.access(p, os.X_OK)]
    if missing:
        raise StoresMissing(
            f"PostgreSQL/Redis binaries not found ({', '.join(missing)}): run `make deploy-tools` "
            f"(tools/install-stores.sh) or point CBEC_STORES_ROOT at an extracted tree"
        )
    return root


def free_port() -> int:
    """A currently free ephemeral TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cache_dir() -> Path:
    """Per-user cache of initialised clusters; traversable by the server uid (it builds them in there)."""
    cache = Path(
        os.environ.get("CBEC_STORES_CACHE")
        or Path(tempfile.gettempdir()) / f"cbec-stores-cache-{os.geteuid()}"
    )
    cache.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = cache.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise RuntimeError(f"{cache} is not a directory of uid {os.geteuid()}: set CBEC_STORES_CACHE")
    return cache


def remove_tree_later(path: Path) -> None:
    """Delete a directory in a detached ``rm -rf``: deleting ~1000 fsynced files takes seconds on a
    disk mounted with ``discard`` (each freed extent is trimmed), nothing worth waiting for."""
    if not path.exists():
        return
    try:
        subprocess.Popen(
            ["rm", "-rf", "--", str(path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def shared_fields(pg_url: str, redis_url: str) -> dict[str, str]:
    """Settings fields of the shared state backend on the fixtures' servers (for in-process servers)."""
    return {
        "state_backend": "shared",
        "database_url": pg_url,
        "database_password": PG_PASSWORD,
        "redis_url": redis_url,
        "redis_password": REDIS_PASSWORD,
    }


def store_env(pg_url: str, redis_url: str) -> dict[str, str]:
    """The same as environment variables (for services started as processes)."""
    return {f"CBEC_{k.upper()}": v for k, v in shared_fields(pg_url, redis_url).items()}


class _Server:
    """Process handling shared by both servers: a child in its own process group, logged to a file."""

    name = "server"

    def __init__(self, root: Path | None, base_dir: Path | None, port: int | None) -> None:
        self.root = require_stores(root)
        self._own_dir = base_dir is None  # made here: close() deletes it
        if base_dir is None:
            base_dir = Path(tempfile.mkdtemp(prefix=f"cbec-{self.name}-"))
        self.dir = Path(base_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.host = "127.0.0.1"
        self.log_path = self.dir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0  # how long the last start() took

    # -- process ------------------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        libdir = str(self.root / LIB_DIR)
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
        env["LC_ALL"] = "C"
        return env

    def _spawn(self, argv: list[str], env: Mapping[str, str]) -> None:
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _signal(self, sig: int, *, group: bool) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self._proc.pid, sig)
            else:
                os.kill(self._proc.pid, sig)

    def _wait_exit(self, timeout: float) -> None:
        assert self._proc is not None
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL, group=True)
            self._proc.wait(5)
        # Children left in the group (PostgreSQL backends) go too: nothing may hold the data dir.
        self._signal(signal.SIGKILL, group=True)
        self._wait_group_gone()

    def _wait_group_gone(self, timeout: float = 5.0) -> None:
        """Wait until no process of the server's group is left (orphaned backends exit a little after
        the postmaster; a restart on the same data dir or deleting it must not race them)."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self._proc.pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:  # the pgid was reused by someone else's process
                break
            time.sleep(0.005)
        self._proc = None

    def kill9(self) -> None:
        """SIGKILL the server and every process it started (a crash: no shutdown, no flush)."""
        if self._proc is None:
            return
        self._signal(signal.SIGKILL, group=True)
        self._proc.wait(10)
        self._wait_group_gone()

    def _stop_signal(self, mode: str) -> int:
        raise NotImplementedError

    def stop(self, mode: str = "immediate", timeout: float = 10.0) -> None:
        """Stop the server, keeping its data (``start()`` again resumes on the same dir and port)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._signal(self._stop_signal(mode), group=False)
        self._wait_exit(timeout)

    def start(self) -> Self:
        raise NotImplementedError

    def restart(self, mode: str = "immediate") -> Self:
        self.stop(mode)
        return self.start()

    def _wait_ready(self, probe: Callable[[], None], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited during start:\n{self.log_tail()}")
            try:
                probe()
                return
            except ImportError:
                raise
            except Exception as e:  # not accepting connections yet
                last = e
                time.sleep(0.02)
        self.kill9()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s ({last!r}):\n{self.log_tail()}")

    def _start_with_retries(self, launch: Callable[[], None]) -> None:
        """Launch; a port taken between picking and binding (when we picked it) gets a new port."""
        t0 = time.monotonic()
        for attempt in range(3):
            try:
                launch()
                break
            except RuntimeError as e:
                taken = "already in use" in str(e) or "could not bind" in str(e).lower()
                if not taken or self._fixed_port or attempt == 2:
                    raise
                self.port = free_port()
        self.start_seconds = time.monotonic() - t0

    def close(self) -> None:
        """Stop the server and delete its temp dir (when it made one)."""
        if self._proc is not None:
            self.kill9() if self._proc.poll() is None else self._wait_exit(1)
        if self._own_dir:
            remove_tree_later(self.dir)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten server must not outlive the test run
        with contextlib.suppress(Exception):
            if self._proc is not None and self._proc.poll() is None:
                os.killpg(self._proc.pid, signal.SIGKILL)


class PostgresServer(_Server):
    """A PostgreSQL 15 cluster in a temp dir, on 127.0.0.1:<port>.

    TCP connections use SCRAM password auth (role ``cbec``, password ``cbec-test-pw``, database ``cbec``
    owned by it); the Unix socket in the temp dir is trust, used for admin (``admin_dsn``, role postgres).
    """

    name = "postgres"

    def __init__(
        self,
        root: Path | None = None,
        *,
        port: int | None = None,
        base_dir: Path | None = None,
        settings: Mapping[str, str | int] | None = None,
        start_timeout: float = 30.0,
        use_template: bool = True,
    ) -> None:
        super().__init__(root, base_dir, port)
        self.use_template = use_template  # copy a cached initdb'd cluster instead of running initdb
        self.password = PG_PASSWORD
        self.user = PG_USER
        self.database = PG_DATABASE
        self.data_dir = self.dir / "data"
        self.socket_dir = self.dir  # short path: a Unix socket path must stay under 107 bytes
        self.settings: dict[str, str | int] = {
            "listen_addresses": "127.0.0.1",
            "fsync": "on",
            "synchronous_commit": "on",
            "max_connections": 200,
            "shared_buffers": "64MB",
            "jit": "off",  # no LLVM load on the first big query
            # Crash recovery (after kill9() or stop()) first syncs the data dir: one syncfs(2) instead of an
            # fsync per file (~1000 files: seconds on a busy disk).
            "recovery_init_sync_method": "syncfs",
            "password_encryption": "scram-sha-256",
            "log_min_messages": "warning",
            **(settings or {}),
        }
        self.start_timeout = start_timeout
        self._as_uid = SERVER_UID if os.geteuid() == 0 else None
        self._bin = self.root / PG_BIN_DIR
        self._db_counter = 0

    # -- URLs -----------------------------------------------------------------------------------------
    def url(self, database: str | None = None) -> str:
        """postgresql:// URL for role cbec over TCP, without the password (pass ``password=``)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database or self.database}"

    @property
    def dsn(self) -> str:
        return self.url()

    @property
    def admin_dsn(self) -> str:
        """Superuser ``postgres`` over the Unix socket (trust, no password)."""
        return f"postgresql://postgres@/postgres?host={quote(str(self.socket_dir), safe='')}&port={self.port}"

    # -- process --------------------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = super()._env()
        uid = self._as_uid if self._as_uid is not None else os.geteuid()
        try:
            pwd.getpwuid(uid)
        except KeyError:  # initdb looks the uid up: give it a passwd entry via nss_wrapper
            wrapper = self.root / LIB_DIR / "libnss_wrapper.so"
            if not wrapper.exists():
                raise StoresMissing(
                    f"uid {uid} has no passwd entry and {wrapper} is missing: "
                    "run `make deploy-tools` (tools/install-stores.sh installs libnss-wrapper)"
                ) from None
            gid = self._as_uid if self._as_uid is not None else os.getegid()
            nss = self.dir / "nss"
            nss.mkdir(exist_ok=True)
            (nss / "passwd").write_text(f"cbecpg:x:{uid}:{gid}:cbec:{self.dir}:/bin/false\n")
            (nss / "group").write_text(f"cbecpg:x:{gid}:\n")
            env["LD_PRELOAD"] = str(wrapper)
            env["NSS_WRAPPER_PASSWD"] = str(nss / "passwd")
            env["NSS_WRAPPER_GROUP"] = str(nss / "group")
        return env

    def _argv(self, binary: str, *args: str) -> list[str]:
        argv = [str(self._bin / binary), *args]
        if self._as_uid is not None:
            uid = str(self._as_uid)
            argv = ["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups", *argv]
        return argv

    def _own_dir_for_server(self) -> None:
        if self._as_uid is not None:
            os.chown(self.dir, self._as_uid, self._as_uid)
            os.chmod(self.dir, 0o755)

    def _initdb(self) -> None:
        self._own_dir_for_server()
        done = subprocess.run(
            self._argv(
                "initdb", "-D", str(self.data_dir), "-L", str(self.root / PG_SHARE_DIR), *_INITDB_OPTIONS
            ),
            env=self._env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        if done.returncode:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout.decode(errors='replace')}")
        (self.data_dir / "pg_hba.conf").write_text(_PG_HBA)

    def _write_conf(self) -> None:
        conf = {**self.settings, "port": self.port, "unix_socket_directories": str(self.socket_dir)}
        auto = self.data_dir / "postgresql.auto.conf"
        auto.write_text("# written by tests/stores.py\n" + "".join(f"{k} = '{v}'\n" for k, v in conf.items()))
        if self._as_uid is not None:
            os.chown(auto, self._as_uid, self._as_uid)

    def _probe(self) -> None:
        import psycopg

        psycopg.connect(self.admin_dsn, connect_timeout=2).close()

    def _launch(self) -> None:
        self._write_conf()
        self._spawn(self._argv("postgres", "-D", str(self.data_dir)), self._env())
        self._wait_ready(self._probe, self.start_timeout)

    def start(self) -> Self:
        """initdb on first use (role and database cbec included), then start and wait for connections."""
        if self.running:
            return self
        fresh = not (self.data_dir / "PG_VERSION").exists()
        if fresh and self.use_template:
            self._own_dir_for_server()
            subprocess.run(["cp", "-a", str(self._template()), str(self.data_dir)], check=True)
            fresh = False  # role and database cbec are in the template
        elif fresh:
            self._initdb()
        self._start_with_retries(self._launch)
        if fresh:
            self._bootstrap()
        return self

    def _template(self) -> Path:
        """A cleanly shut down, bootstrapped cluster that each server copies (~0.1-0.5 s) instead of
        running initdb + bootstrap (1-2 s, more on a busy machine). Made once per machine and kept in
        ``$CBEC_STORES_CACHE`` (default ``<tmp>/cbec-stores-cache-<euid>``), keyed on the binaries and
        on everything initdb and the bootstrap are given."""
        postgres = (self._bin / "postgres").stat()
        binaries = (str(self.root), postgres.st_size, postgres.st_mtime_ns, self._as_uid)
        recipe = repr(
            (*binaries, _INITDB_OPTIONS, _PG_HBA, self.user, self.password, self.database, _TEMPLATE_VERSION)
        )
        key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
        template = _PG_TEMPLATES.get(key)
        if template is not None and (template / "PG_VERSION").exists():
            return template
        cache = _cache_dir()
        final = cache / f"pg15-{key}"
        if not (final / ".ready").exists():
            build_dir = Path(tempfile.mkdtemp(prefix="build-", dir=cache))
            try:
                builder = PostgresServer(
                    self.root, base_dir=build_dir, use_template=False, start_timeout=self.start_timeout
                )
                builder.start()
                builder.stop("fast")  # a shutdown checkpoint: the copies need no recovery
                (build_dir / ".ready").touch()
                try:
                    os.rename(build_dir, final)
                except OSError:  # another process made it first (or a broken one is in the way)
                    if not (final / ".ready").exists():
                        remove_tree_later(final)
                        raise
            finally:
                remove_tree_later(build_dir)
        template = _PG_TEMPLATES[key] = final / "data"
        return template

    def _stop_signal(self, mode: str) -> int:
        # pg_ctl stop -m smart|fast|immediate sends exactly these to the postmaster.
        return {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]

    # -- SQL ------------------------------------------------------------------------------------------
    def admin_execute(self, *statements: str, database: str = "postgres") -> None:
        """Run statements as superuser over the socket, autocommit (CREATE DATABASE needs it)."""
        import psycopg

        dsn = self.admin_dsn.replace("@/postgres?", f"@/{database}?", 1)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]

    def _bootstrap(self) -> None:
        self.admin_execute(
            f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'",
            f"CREATE DATABASE {self.database} OWNER {self.user}",
        )

    def create_database(self, name: str | None = None) -> str:
        """A fresh empty database owned by cbec; returns its URL (without the password)."""
        if name is None:
            self._db_counter += 1
            name = f"t{self._db_counter}_{uuid.uuid4().hex[:8]}"
        if not _IDENTIFIER.match(name):
            raise ValueError(f"database name {name!r}: use [a-z_][a-z0-9_]*, at most 63 characters")
        self.admin_execute(f"CREATE DATABASE {name} OWNER {self.user}")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        if not _IDENTIFIER.match(name):
            raise ValueError(f"database name {name!r}")
        self.admin_execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class RedisServer(_Server):
    """A Redis 7 server in a temp dir, on 127.0.0.1:<port>, with ``requirepass``.

    Append-only with ``appendfsync always`` by default, so a write acknowledged is on disk (a
    durability claim about Redis can be tested with ``kill9()`` + ``start()``).
    """

    name = "redis"

    def __init__(
        self,
        root: Path | None = None,
        *,
        port: int | None = None,
        base_dir: Path | None = None,
        appendonly: bool = True,
        appendfsync: str = "always",
        extra_args: list[str] | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        super().__init__(root, base_dir, port)
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync {appendfsync!r}: always, everysec or no")
        self.password = REDIS_PASSWORD
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args or [])
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        """redis:// URL of database 0, without the password (pass ``password=``)."""
        return f"redis://{self.host}:{self.port}/0"

    def _argv(self) -> list[str]:
        return [
            str(self.root / "usr/bin/redis-server"),
            "--port", str(self.port), "--bind", self.host, "--save", "", "--dir", str(self.dir),
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync,
            "--requirepass", self.password, "--daemonize", "no", "--logfile", "",
            *self.extra_args,
        ]  # fmt: skip

    def command(self, *args: str, timeout: float = 2.0) -> bytes:
        """One authenticated command over a raw socket (no client library needed), for commands with a
        one-line reply (PING, FLUSHDB, SET, INCR...): returns that line, e.g. ``b"+OK"``."""
        parts = ["AUTH", self.password], list(args)
        payload = b"".join(
            b"*%d\r\n" % len(p) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in p)
            for p in parts
        )
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            s.sendall(payload)
            data = b""
            while data.count(b"\r\n") < 2:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        auth, _, rest = data.partition(b"\r\n")
        if auth != b"+OK":
            raise RuntimeError(f"redis AUTH: {auth!r}")
        return rest.partition(b"\r\n")[0]

    def _probe(self) -> None:
        reply = self.command("PING")
        if reply != b"+PONG":  # -LOADING while the AOF is replayed
            raise RuntimeError(f"redis PING: {reply!r}")

    def _launch(self) -> None:
        self._spawn(self._argv(), self._env())
        self._wait_ready(self._probe, self.start_timeout)

    def start(self) -> Self:
        """Start (or restart on the same dir and port, replaying the AOF) and wait for PING."""
        if not self.running:
            self._start_with_retries(self._launch)
        return self

    def _stop_signal(self, mode: str) -> int:
        return signal.SIGTERM  # any mode: with --save '' a shutdown only fsyncs the AOF, which is quick

    def flushdb(self) -> None:
        reply = self.command("FLUSHDB")
        if reply != b"+OK":
            raise RuntimeError(f"redis FLUSHDB: {reply!r}")


# -- pytest fixtures (import them into a test module or a conftest) -----------------------------------
_S = TypeVar("_S", bound=_Server)


def _start_or_fail(cls: type[_S]) -> _S:
    try:
        server = cls()
    except StoresMissing as e:
        pytest.fail(str(e), pytrace=False)
    try:
        return server.start()
    except StoresMissing as e:
        server.close()
        pytest.fail(str(e), pytrace=False)
    except BaseException:
        server.close()
        raise


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the test session."""
    server = _start_or_fail(PostgresServer)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis server for the test session."""
    server = _start_or_fail(RedisServer)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """A fresh database (owned by cbec) for this test: its URL, password in ``PG_PASSWORD``."""
    return postgres_server.create_database()


@pytest.fixture
def redis_db(redis_server: RedisServer) -> str:
    """The session Redis, database 0 flushed before this test: its URL, password in ``REDIS_PASSWORD``."""
    redis_server.flushdb()
    return redis_server.url


@pytest.fixture
def postgres(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """The session's PostgreSQL for a test that stops or kills it: running again afterwards, whatever
    the test did (a private server would cost seconds to start)."""
    try:
        yield postgres_server
    finally:
        if not postgres_server.running:
            postgres_server.start()
