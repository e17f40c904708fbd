"""privacyIDEA 3.14 baseline for the push-login benchmark: the machine-side approval round trip
of privacyIDEA's PUSH token in poll-only mode (no Firebase), measured on loopback.

API (import with ``bench/`` on ``sys.path``)::

    from pushauth_privacyidea import PrivacyIdeaBaseline, PushLoginFailed

    with PrivacyIdeaBaseline() as pi:            # venv, fresh server, policy, one checked login
        r = pi.run(logins=20, concurrency=1)     # -> Result (raises PushLoginFailed on any
        print(r.p50, r.p99, r.mean, r.count)     #    login not accepted; .result has the figures)
        r = pi.run(logins=500, concurrency=500)  # await pi.arun(...) from inside an event loop

``PrivacyIdeaBaseline(server="gunicorn" | "dev", workers=2, threads=8, sqlite_timeout=None,
request_timeout=120.0, verbose=True, keep_scratch=False)``. ``Result`` is a frozen dataclass:
``samples_ms`` (one per accepted login, completion order), ``p50``/``p99``/``mean`` (ms),
``count``, ``failures``, ``errors`` (client-side messages, counted), ``server_errors`` (the
exception lines privacyIDEA logged meanwhile, counted: the cause behind an HTTP 500),
``steps_ms`` (median per leg), ``wall_s``, ``logins_per_s``, ``load_before``/``load_after``
(os.getloadavg), and the metadata ``privacyidea_version``, ``server``, ``database``,
``phone_key_bits``, ``install_seconds``. ``PrivacyIdeaBaseline.metadata()`` gives the
metadata as a dict (also setup and enrolment time).

Setup. privacyIDEA lives in its own venv, outside the project's dependencies, at
``~/.cache/keybroker-bench/privacyidea/<version>/venv`` (``python -m venv`` + ``pip install
privacyidea==<version> gunicorn==<pinned>``, built once under a file lock and reused; its
install time is kept in ``install.json`` beside it). Each ``with`` block makes a fresh scratch
directory (``/tmp/pi-bench-*``, removed at exit): ``pi.cfg`` on SQLite, then the documented
``pi-manage setup create_enckey / create_audit_keys / create_tables`` and ``pi-manage admin
add``, run in one interpreter through pi-manage's own click entry point (the same commands,
one import instead of four), and the server on a free loopback port. Servers:

* ``gunicorn`` (default): ``gunicorn -k gthread -w 2 --threads 8`` on
  ``privacyidea.app:create_app(config_name='production')`` (the app ``pi-manage`` builds), so
  both cores serve and many requests are in flight at once; keep-alive is raised to the request
  timeout (gunicorn's 2 s default resets connections a busy client is about to reuse);
* ``dev``: ``pi-manage run -h 127.0.0.1 -p PORT``, Werkzeug's threaded development server in
  one process: what the reference note (``shared/notes/privacyidea-poll-only.md``) measured.

SQLite keeps pysqlite's 5 s busy timeout unless ``sqlite_timeout`` says otherwise (the token
and audit engines share it; with 5 s, a few requests answer HTTP 500 "database is locked" once
~100-500 logins are in flight on the 2-core machine, with 60 s none did); everything else is
privacyIDEA's production default (audit log and responses signed, INFO log to a file). The
server runs in its own session and is stopped by process group (SIGTERM, then SIGKILL) when
the block exits, on an exception or Ctrl-C too, with an ``atexit`` fallback.

Flow (exactly as in the note). Admin: ``POST /auth``; enrollment policy ``push_enroll`` with
``push_firebase_configuration=poll only``, ``push_registration_url=<server>/ttype/push``,
``push_ssl_verify=0``. Per simulated user, one PUSH token, addressed by serial as in the note
(no user store): ``POST /token/init type=push
genkey=1`` (the ``otpauth://pipush`` URI must say ``poll_only=True``), then the phone's step 2:
``POST /ttype/push enrollment_credential, serial, pubkey (URL-safe base64 SPKI), fbtoken=""``,
which returns the server's per-token RSA-4096 public key. Phone keys are RSA-4096 as in the
privacyIDEA Authenticator app, generated once and cached in the cache directory (key
generation is not what is measured). One login, timed from the start of the trigger to the
accepted final check:

1. ``trigger``: client ``POST /validate/check serial, pass=""`` -> ``transaction_id``;
2. ``phone_poll``: phone ``GET /ttype/push serial, timestamp, signature(serial|timestamp)``;
   exactly one open challenge must come back, and its server signature over
   ``nonce|url|serial|question|title|sslverify`` must verify;
3. ``phone_answer``: phone ``POST /ttype/push serial, nonce, signature(nonce|serial)`` -> true;
4. ``polltransaction``: client ``GET /validate/polltransaction transaction_id`` -> true;
5. ``finalize``: client ``POST /validate/check serial, pass="", transaction_id`` -> true/ACCEPT.

Signatures are RSA PKCS#1 v1.5 / SHA-256, base32. The human is an instant approve and the phone
polls at once (no app poll interval, no push gateway), so a sample is the server-side path plus
the phone's signing, over loopback HTTP/1.1 with keep-alive. Anything else (an HTTP error, a
timeout, a false value, a bad server signature, not exactly one open challenge) is a failure:
counted, its message kept, never a silently dropped sample, and ``run`` raises
``PushLoginFailed`` (with the partial ``Result``) unless ``raise_on_failure=False``.

Concurrency. ``run(logins, concurrency)`` starts ``c = min(concurrency, logins)`` workers on one
asyncio loop (``httpx.AsyncClient``, one pooled connection per worker), released together; each
worker owns its own token (a distinct simulated user) and does its share of the logins one
after another. Tokens are enrolled, untimed, before the first run that needs them. A token left
with open challenges by a failed login is drained (its phone declines them) before the next
run. p99 is the nearest-rank percentile (with 20 samples it is the slowest one).

Standalone: ``python bench/pushauth_privacyidea.py [--quick] [--logins N]
[--concurrency 1,500] [--server gunicorn|dev]``. Each level runs ``max(N, c)`` logins rounded
up to a multiple of c. When a level fails, the script says so, then steps the concurrency down
(halving) to find the highest level that worked, and prints that too. It ends with
``BENCH pushauth.privacyidea_<p50|p99>_c<C> value=<ms> unit=ms goal=>=0`` lines, and
``BENCH pushauth.privacyidea_failed_logins_c<C> value=<n> unit=logins goal=>=0`` for a level
that failed. ``--quick`` runs 20 logins at c=1 and 32 at c=16 (about a minute once the venv is
cached). Exits non-zero only if the setup or the c=1 level breaks.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import datetime
import fcntl
import json
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

#: Latest 3.14.x on PyPI when this was written (there is only 3.14 itself).
PI_VERSION = "3.14"
GUNICORN_VERSION = "27.0.1"
CACHE_ROOT = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "keybroker-bench"
) / "privacyidea"
ADMIN_USER = "admin"
ADMIN_PASSWORD = "adminpw"  # a throwaway server on loopback
PHONE_KEY_BITS = 4096
_T = TypeVar("_T")
STEPS = ("trigger", "phone_poll", "phone_answer", "polltransaction", "finalize")

_SETUP_SCRIPT = """
from privacyidea.cli.pimanage import cli
for args in (["setup", "create_enckey"], ["setup", "create_audit_keys"],
             ["setup", "create_tables"], ["admin", "add", %r, "-p", %r]):
    cli.main(args, standalone_mode=False, prog_name="pi-manage")
"""


class SetupError(RuntimeError):
    """privacyIDEA could not be installed, configured or started."""


class LoginError(RuntimeError):
    """One push login did not end in an accepted final check."""


class PushLoginFailed(RuntimeError):
    """A run had failed logins; ``result`` holds what was measured, failures included."""

    def __init__(self, result: Result) -> None:
        summary = "; ".join(result.errors[:3])
        super().__init__(
            f"{result.failures} of {result.logins} logins failed at concurrency "
            f"{result.concurrency}: {summary}"
        )
        self.result = result


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class Result:
    """One ``run``: the accepted logins' round trips and what was going on around them."""

    logins: int
    concurrency: int
    samples_ms: tuple[float, ...]
    failures: int
    errors: tuple[str, ...]
    steps_ms: dict[str, float]
    wall_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    privacyidea_version: str
    server: str
    database: str = "sqlite"
    #: Distinct exception lines privacyIDEA logged during the run (the cause behind an HTTP 500).
    server_errors: tuple[str, ...] = ()
    phone_key_bits: int = PHONE_KEY_BITS
    install_seconds: float | None = None

    @property
    def count(self) -> int:
        return len(self.samples_ms)

    @property
    def p50(self) -> float:
        return statistics.median(self.samples_ms) if self.samples_ms else math.nan

    @property
    def p99(self) -> float:
        return _percentile(sorted(self.samples_ms), 99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples_ms) if self.samples_ms else math.nan

    @property
    def logins_per_s(self) -> float:
        return self.count / self.wall_s if self.wall_s > 0 else math.nan


@dataclass
class _Token:
    serial: str
    phone_key: rsa.RSAPrivateKey
    server_key: rsa.RSAPublicKey | None = None
    dirty: bool = False


@dataclass
class _Tally:
    samples: list[float] = field(default_factory=list)
    steps: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STEPS})
    errors: Counter[str] = field(default_factory=Counter)


# --- the cached venv -----------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _installed_version(python: Path) -> str | None:
    if not python.exists():
        return None
    out = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m; print(m.version('privacyidea'), "
            "m.version('gunicorn'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_venv(version: str = PI_VERSION, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The privacyIDEA venv for ``version``, built on first use; its ``install.json``."""
    home = CACHE_ROOT / version
    venv_dir = home / "venv"
    marker = home / "install.json"
    python = venv_dir / "bin" / "python"
    with _file_lock(CACHE_ROOT / f".{version}.lock"):
        if marker.exists() and _installed_version(python) == f"{version} {GUNICORN_VERSION}":
            info: dict[str, Any] = json.loads(marker.read_text())
            info["reused"] = True
            return info
        if venv_dir.exists():
            shutil.rmtree(venv_dir)
        marker.unlink(missing_ok=True)
        log(f"installing privacyidea=={version} into {venv_dir} (one time)")
        started = time.perf_counter()
        base_python = getattr(sys, "_base_executable", sys.executable)
        steps = [
            [base_python, "-m", "venv", str(venv_dir)],
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                f"privacyidea=={version}",
                f"gunicorn=={GUNICORN_VERSION}",
            ],
        ]
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
                raise SetupError(f"{' '.join(cmd[:4])} ... failed ({done.returncode}):\n{tail}")
        info = {
            "privacyidea": version,
            "gunicorn": GUNICORN_VERSION,
            "python": subprocess.run(
                [str(python), "-c", "import sys; print(sys.version.split()[0])"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip(),
            "install_seconds": round(time.perf_counter() - started, 1),
            "installed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        marker.write_text(json.dumps(info, indent=2) + "\n")
        info["reused"] = False
        log(f"installed in {info['install_seconds']} s")
        return info


# --- phone keys ------------------------------------------------------------------------------


def _new_phone_key_pem(bits: int) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def phone_keys(n: int, bits: int = PHONE_KEY_BITS, log: Callable[[str], None] = print) -> list[Any]:
    """``n`` phone RSA keys, from a cache file that grows as needed (generation is slow)."""
    path = CACHE_ROOT / f"phone-keys-rsa{bits}.pem"
    end = b"-----END PRIVATE KEY-----\n"
    with _file_lock(CACHE_ROOT / ".phone-keys.lock"):
        blob = path.read_bytes() if path.exists() else b""
        pems = [p + end for p in blob.split(end) if p.strip()]
        if len(pems) < n:
            missing = n - len(pems)
            log(f"generating {missing} phone RSA-{bits} keys (cached for later runs)")
            with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                new = list(pool.map(_new_phone_key_pem, [bits] * missing))
            with path.open("ab") as fh:
                fh.writelines(new)
            pems += new
    return [
        serialization.load_pem_private_key(p, None, unsafe_skip_rsa_key_validation=True)
        for p in pems[:n]
    ]


# --- helpers ---------------------------------------------------------------------------------


def _b32sign(key: rsa.RSAPrivateKey, text: str) -> str:
    sig = key.sign(text.encode(), padding.PKCS1v15(), hashes.SHA256())
    return base64.b32encode(sig).decode()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _body(resp: httpx.Response, what: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = resp.json()
    except ValueError:
        raise LoginError(
            f"{what}: HTTP {resp.status_code}, not JSON: {resp.text[:120]!r}"
        ) from None
    result = data.get("result") or {}
    if resp.status_code != 200 or not result.get("status"):
        err = (result.get("error") or {}).get("message") or resp.text[:160]
        raise LoginError(f"{what}: HTTP {resp.status_code}: {err}")
    return data


def _value(data: dict[str, Any]) -> Any:
    return data["result"].get("value")


def _run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run``, also from code that already runs an event loop (then in a thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200] if not isinstance(exc, LoginError) else text[:200]


# --- the baseline ----------------------------------------------------------------------------


class PrivacyIdeaBaseline:
    """A fresh privacyIDEA server (context manager) and the push-login driver for it."""

    def __init__(
        self,
        *,
        server: str = "gunicorn",
        workers: int = 2,
        threads: int = 8,
        version: str = PI_VERSION,
        request_timeout: float = 120.0,
        phone_key_bits: int = PHONE_KEY_BITS,
        verbose: bool = True,
        keep_scratch: bool = False,
        sqlite_timeout: float | None = None,
    ) -> None:
        if server not in ("gunicorn", "dev"):
            raise ValueError("server must be 'gunicorn' or 'dev'")
        self.server_kind = server
        self.workers = workers
        self.threads = threads
        self.version = version
        self.request_timeout = request_timeout
        self.phone_key_bits = phone_key_bits
        self.verbose = verbose
        self.keep_scratch = keep_scratch
        self.sqlite_timeout = sqlite_timeout
        self.install: dict[str, Any] = {}
        self.scratch: Path | None = None
        self.base_url = ""
        self.setup_seconds = math.nan
        self.enrol_seconds = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._server_log: Path | None = None
        self._admin_jwt = ""
        self._tokens: list[_Token] = []
        self._pi_version = version

    # -- lifecycle

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"[privacyidea] {msg}", file=sys.stderr, flush=True)

    @property
    def server(self) -> str:
        if self.server_kind == "gunicorn":
            return (
                f"gunicorn {GUNICORN_VERSION} gthread, {self.workers} workers x "
                f"{self.threads} threads"
            )
        return "werkzeug dev server (pi-manage run, threaded, 1 process)"

    @property
    def database(self) -> str:
        timeout = self.sqlite_timeout if self.sqlite_timeout is not None else 5
        default = "" if self.sqlite_timeout is not None else ", pysqlite default"
        return f"sqlite (busy timeout {timeout:g} s{default})"

    def metadata(self) -> dict[str, Any]:
        return {
            "privacyidea_version": self._pi_version,
            "server": self.server,
            "database": self.database,
            "phone_key_bits": self.phone_key_bits,
            "install_seconds": self.install.get("install_seconds"),
            "venv_reused": self.install.get("reused"),
            "setup_seconds": round(self.setup_seconds, 1),
            "enrol_seconds": round(self.enrol_seconds, 1),
            "tokens": len(self._tokens),
        }

    def __enter__(self) -> PrivacyIdeaBaseline:
        atexit.register(self.close)
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self.install = ensure_venv(self.version, log=self.log)
        started = time.perf_counter()
        venv_bin = CACHE_ROOT / self.version / "venv" / "bin"
        self.scratch = Path(tempfile.mkdtemp(prefix="pi-bench-"))
        cfg = self.scratch / "pi.cfg"
        settings = {
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{self.scratch / 'pi.sqlite'}",
            "SECRET_KEY": secrets.token_hex(24),
            "PI_PEPPER": secrets.token_hex(24),
            "PI_ENCFILE": str(self.scratch / "enckey"),
            "PI_AUDIT_KEY_PRIVATE": str(self.scratch / "private.pem"),
            "PI_AUDIT_KEY_PUBLIC": str(self.scratch / "public.pem"),
            "PI_LOGFILE": str(self.scratch / "privacyidea.log"),
            "PI_UUID_FILE": str(self.scratch / "uuid.txt"),
        }
        text = "".join(f"{k} = {v!r}\n" for k, v in settings.items())
        if self.sqlite_timeout is not None:
            # Used by the token and the audit engines alike (PI_AUDIT_SQL_OPTIONS is unset).
            options = {"connect_args": {"timeout": self.sqlite_timeout}}
            text += f"SQLALCHEMY_ENGINE_OPTIONS = {options!r}\n"
        cfg.write_text(text)
        env = {**os.environ, "PRIVACYIDEA_CONFIGFILE": str(cfg)}
        env.pop("VIRTUAL_ENV", None)
        done = subprocess.run(
            [str(venv_bin / "python"), "-c", _SETUP_SCRIPT % (ADMIN_USER, ADMIN_PASSWORD)],
            cwd=self.scratch,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not (self.scratch / "enckey").exists():
            raise SetupError(f"pi-manage setup failed:\n{(done.stdout + done.stderr)[-2000:]}")

        port = _free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        if self.server_kind == "gunicorn":
            cmd = [
                str(venv_bin / "gunicorn"),
                "--worker-class",
                "gthread",
                "--workers",
                str(self.workers),
                "--threads",
                str(self.threads),
                "--bind",
                f"127.0.0.1:{port}",
                "--timeout",
                str(int(self.request_timeout) + 30),
                "--graceful-timeout",
                "5",
                # Gunicorn closes idle keep-alive connections after 2 s by default; a client
                # reusing one at that instant gets a reset that is no fault of privacyIDEA.
                "--keep-alive",
                str(int(self.request_timeout)),
                "--backlog",
                "2048",
                "--no-control-socket",
                "privacyidea.app:create_app(config_name='production', silent=True)",
            ]
        else:
            cmd = [str(venv_bin / "pi-manage"), "run", "-h", "127.0.0.1", "-p", str(port)]
        self._server_log = self.scratch / "server.out"
        with self._server_log.open("wb") as out:
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.scratch,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.log(f"{self.server} on {self.base_url}, scratch {self.scratch}")
        _run_sync(self._bootstrap())
        self.setup_seconds = time.perf_counter() - started
        self.log(
            f"privacyIDEA {self._pi_version} ready in {self.setup_seconds:.1f} s "
            "(setup, start, policy, one checked login)"
        )

    def _log_size(self) -> int:
        log = self.scratch / "privacyidea.log" if self.scratch else None
        return log.stat().st_size if log and log.exists() else 0

    def _server_errors_since(self, offset: int) -> tuple[str, ...]:
        """The exception lines privacyIDEA logged past ``offset``, counted, most common first."""
        log = self.scratch / "privacyidea.log" if self.scratch else None
        if log is None or not log.exists():
            return ()
        with log.open("rb") as fh:
            if fh.seek(0, os.SEEK_END) >= offset:
                fh.seek(offset)
            else:  # rotated meanwhile: what the new file has
                fh.seek(0)
            text = fh.read().decode(errors="replace")
        found: Counter[str] = Counter()
        for line in text.splitlines():
            head = line.split(":", 1)[0]
            if (
                line[:1].isalpha()
                and ": " in line
                and head.replace(".", "").replace("_", "").isalnum()
                and head.endswith(("Error", "Exception"))
            ):
                found[line[:160]] += 1
        return tuple(f"{n}x {msg}" for msg, n in found.most_common())

    def _server_tail(self) -> str:
        if self._server_log and self._server_log.exists():
            return self._server_log.read_text(errors="replace")[-1500:]
        return ""

    def close(self) -> None:
        """Stop the server (its whole process group) and remove the scratch directory."""
        atexit.unregister(self.close)
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            # Workers the leader left behind, if any, are still in its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self.scratch is not None and not self.keep_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    # -- admin side

    def _client(self, connections: int) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(
            base_url=self.base_url, timeout=self.request_timeout, limits=limits
        )

    async def _bootstrap(self) -> None:
        async with self._client(4) as client:
            deadline = time.monotonic() + 90
            while True:
                if self._proc is None or self._proc.poll() is not None:
                    raise SetupError(f"server exited early:\n{self._server_tail()}")
                try:
                    resp = await client.post(
                        "/auth", data={"username": ADMIN_USER, "password": ADMIN_PASSWORD}
                    )
                    if resp.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SetupError(f"server not answering after 90 s:\n{self._server_tail()}")
                await asyncio.sleep(0.2)
            data = _body(resp, "POST /auth")
            self._admin_jwt = data["result"]["value"]["token"]
            self._pi_version = str(data.get("versionnumber") or self.version)
            policy = (
                "push_firebase_configuration=poll only, "
                f"push_registration_url={self.base_url}/ttype/push, push_ssl_verify=0"
            )
            _body(
                await client.post(
                    "/policy/push_enroll",
                    headers={"Authorization": self._admin_jwt},
                    data={"scope": "enrollment", "action": policy, "active": "true"},
                ),
                "POST /policy/push_enroll",
            )
        # Cross-check before timing: one token, one login, which must be accepted.
        await self._ensure_tokens(1)
        async with self._client(2) as client:
            await self._login(client, self._tokens[0], {s: [] for s in STEPS})

    async def _enrol(self, client: httpx.AsyncClient, key: rsa.RSAPrivateKey) -> _Token:
        init = _body(
            await client.post(
                "/token/init",
                headers={"Authorization": self._admin_jwt},
                data={"type": "push", "genkey": "1"},
            ),
            "POST /token/init",
        )["detail"]
        uri = init["pushurl"]["value"]
        if "poll_only=True" not in uri:
            raise SetupError(f"token is not poll-only: {uri}")
        token = _Token(serial=init["serial"], phone_key=key)
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        step2 = _body(
            await client.post(
                "/ttype/push",
                data={
                    "enrollment_credential": init["enrollment_credential"],
                    "serial": token.serial,
                    "pubkey": base64.urlsafe_b64encode(spki).decode(),
                    "fbtoken": "",
                },
            ),
            "POST /ttype/push (enrollment step 2)",
        )["detail"]
        if step2.get("rollout_state") != "enrolled":
            raise SetupError(f"token {token.serial} not enrolled: {step2}")
        server_key = serialization.load_der_public_key(base64.b64decode(step2["public_key"]))
        if not isinstance(server_key, rsa.RSAPublicKey):
            raise SetupError("server public key is not RSA")
        token.server_key = server_key
        return token

    async def _ensure_tokens(self, n: int) -> None:
        missing = n - len(self._tokens)
        if missing <= 0:
            return
        keys = phone_keys(n, self.phone_key_bits, log=self.log)[len(self._tokens) :]
        self.log(f"enrolling {missing} push tokens (untimed; RSA-4096 keygen on the server each)")
        started = time.perf_counter()
        parallel = 2 * self.workers if self.server_kind == "gunicorn" else 2
        sem = asyncio.Semaphore(parallel)

        async def one(client: httpx.AsyncClient, key: rsa.RSAPrivateKey) -> _Token:
            async with sem:
                return await self._enrol(client, key)

        async with self._client(parallel + 2) as client:
            new = await asyncio.gather(*(one(client, k) for k in keys))
        self._tokens.extend(new)
        self.enrol_seconds += time.perf_counter() - started
        self.log(f"enrolled {missing} in {time.perf_counter() - started:.1f} s")

    # -- one login

    async def _login(
        self, client: httpx.AsyncClient, token: _Token, steps: dict[str, list[float]]
    ) -> float:
        """One push login; the round trip in ms, or LoginError/httpx errors."""
        serial = token.serial
        t0 = time.perf_counter()
        trig = _body(
            await client.post("/validate/check", data={"serial": serial, "pass": ""}),
            "trigger /validate/check",
        )
        if trig["result"].get("authentication") != "CHALLENGE":
            raise LoginError(f"trigger: no challenge ({trig['result']})")
        txid = trig["detail"]["transaction_id"]
        t1 = time.perf_counter()

        ts = _now_iso()
        poll = _body(
            await client.get(
                "/ttype/push",
                params={
                    "serial": serial,
                    "timestamp": ts,
                    "signature": _b32sign(token.phone_key, f"{serial}|{ts}"),
                },
            ),
            "phone poll GET /ttype/push",
        )
        challenges = _value(poll)
        if not isinstance(challenges, list) or len(challenges) != 1:
            n = len(challenges) if isinstance(challenges, list) else challenges
            raise LoginError(f"phone poll: expected 1 open challenge, got {n}")
        t2 = time.perf_counter()

        ch = challenges[0]
        signed = "{nonce}|{url}|{serial}|{question}|{title}|{sslverify}".format(**ch)
        if "require_presence" in ch:
            signed += f"|{ch['require_presence']}"
        if token.server_key is None or ch["serial"] != serial:
            raise LoginError("phone poll: challenge for another token")
        try:
            token.server_key.verify(
                base64.b32decode(ch["signature"]),
                signed.encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            raise LoginError("phone poll: server signature does not verify") from None
        nonce = ch["nonce"]
        answer = _body(
            await client.post(
                "/ttype/push",
                data={
                    "serial": serial,
                    "nonce": nonce,
                    "signature": _b32sign(token.phone_key, f"{nonce}|{serial}"),
                },
            ),
            "phone answer POST /ttype/push",
        )
        if _value(answer) is not True:
            raise LoginError(f"phone answer not taken: {answer['result']}")
        t3 = time.perf_counter()

        polled = _body(
            await client.get("/validate/polltransaction", params={"transaction_id": txid}),
            "GET /validate/polltransaction",
        )
        if _value(polled) is not True:
            raise LoginError(f"polltransaction: not answered ({polled['result']})")
        t4 = time.perf_counter()

        final = _body(
            await client.post(
                "/validate/check",
                data={"serial": serial, "pass": "", "transaction_id": txid},
            ),
            "final /validate/check",
        )
        if _value(final) is not True or final["result"].get("authentication") != "ACCEPT":
            raise LoginError(f"final check: not accepted ({final['result']})")
        t5 = time.perf_counter()
        for name, a, b in zip(STEPS, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5), strict=True):
            steps[name].append((b - a) * 1000)
        return (t5 - t0) * 1000

    async def _drain(self, client: httpx.AsyncClient, token: _Token) -> None:
        """Decline whatever a failed login left open on ``token``, so its next poll is clean."""
        ts = _now_iso()
        poll = _body(
            await client.get(
                "/ttype/push",
                params={
                    "serial": token.serial,
                    "timestamp": ts,
                    "signature": _b32sign(token.phone_key, f"{token.serial}|{ts}"),
                },
            ),
            "drain poll",
        )
        for ch in _value(poll) or []:
            nonce = ch["nonce"]
            await client.post(
                "/ttype/push",
                data={
                    "serial": token.serial,
                    "nonce": nonce,
                    "decline": "1",
                    "signature": _b32sign(token.phone_key, f"{nonce}|{token.serial}|decline"),
                },
            )
        token.dirty = False

    # -- runs

    def run(self, logins: int, concurrency: int, *, raise_on_failure: bool = True) -> Result:
        """``logins`` push logins with ``concurrency`` simultaneous users; see the module doc."""
        return _run_sync(self.arun(logins, concurrency, raise_on_failure=raise_on_failure))

    async def arun(self, logins: int, concurrency: int, *, raise_on_failure: bool = True) -> Result:
        if self._proc is None:
            raise RuntimeError("use PrivacyIdeaBaseline as a context manager")
        if logins < 1 or concurrency < 1:
            raise ValueError("logins and concurrency must be >= 1")
        c = min(concurrency, logins)
        await self._ensure_tokens(c)
        tokens = self._tokens[:c]
        dirty = [t for t in tokens if t.dirty]
        if dirty:
            self.log(f"draining {len(dirty)} tokens left with open challenges")
            async with self._client(8) as client:
                for t in dirty:
                    await self._drain(client, t)

        share = [logins // c + (1 if i < logins % c else 0) for i in range(c)]
        tally = _Tally()
        go = asyncio.Event()

        async def worker(client: httpx.AsyncClient, token: _Token, n: int) -> None:
            await go.wait()
            for _ in range(n):
                try:
                    tally.samples.append(await self._login(client, token, tally.steps))
                except (LoginError, httpx.HTTPError, KeyError, ValueError) as exc:
                    tally.errors[_error_text(exc)] += 1
                    token.dirty = True

        log_offset = self._log_size()
        load_before = os.getloadavg()
        async with self._client(c + 4) as client:
            tasks = [
                asyncio.create_task(worker(client, t, n))
                for t, n in zip(tokens, share, strict=True)
            ]
            await asyncio.sleep(0)
            started = time.perf_counter()
            go.set()
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
            wall = time.perf_counter() - started
        failures = sum(tally.errors.values())
        result = Result(
            logins=logins,
            concurrency=c,
            samples_ms=tuple(tally.samples),
            failures=failures,
            errors=tuple(f"{n}x {msg}" for msg, n in tally.errors.most_common()),
            steps_ms={k: statistics.median(v) for k, v in tally.steps.items() if v},
            wall_s=wall,
            load_before=load_before,
            load_after=os.getloadavg(),
            privacyidea_version=self._pi_version,
            server=self.server,
            phone_key_bits=self.phone_key_bits,
            install_seconds=self.install.get("install_seconds"),
            database=self.database,
            server_errors=self._server_errors_since(log_offset),
        )
        if failures and raise_on_failure:
            raise PushLoginFailed(result)
        return result


# --- standalone ------------------------------------------------------------------------------


def _fmt_load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def _row(r: Result) -> str:
    steps = " ".join(f"{k}={r.steps_ms.get(k, math.nan):.0f}" for k in STEPS)
    return (
        f"{r.concurrency:>5} {r.logins:>6} {r.count:>6} {r.failures:>5} {r.p50:>8.1f} "
        f"{r.p99:>8.1f} {r.mean:>8.1f} {r.logins_per_s:>7.1f} {r.wall_s:>7.1f}  "
        f"{_fmt_load(r.load_before)} -> {_fmt_load(r.load_after)}  [{steps}]"
    )


def _raise_on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="20 logins at c=1 and c=16")
    ap.add_argument("--logins", type=int, default=None, help="logins per level (default 50)")
    ap.add_argument("--concurrency", default=None, help="comma-separated levels (default 1,500)")
    ap.add_argument("--server", choices=("gunicorn", "dev"), default="gunicorn")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    ap.add_argument("--threads", type=int, default=8, help="gunicorn threads per worker")
    ap.add_argument("--no-step-down", action="store_true", help="do not retry a failed level")
    ap.add_argument("--keep-scratch", action="store_true")
    ap.add_argument(
        "--sqlite-timeout",
        type=float,
        default=None,
        help="SQLite busy timeout in s (default: pysqlite's 5 s, as in the reference note)",
    )
    args = ap.parse_args(argv)
    logins = args.logins or (20 if args.quick else 50)
    levels = [int(x) for x in (args.concurrency or ("1,16" if args.quick else "1,500")).split(",")]
    signal.signal(signal.SIGTERM, _raise_on_signal)
    signal.signal(signal.SIGHUP, _raise_on_signal)

    print(f"# load before setup: {_fmt_load(os.getloadavg())} ({os.cpu_count()} cpus)")
    figures: list[tuple[str, float]] = []
    results: list[Result] = []
    broken = False
    with PrivacyIdeaBaseline(
        server=args.server,
        sqlite_timeout=args.sqlite_timeout,
        workers=args.workers,
        threads=args.threads,
        keep_scratch=args.keep_scratch,
    ) as pi:
        meta = pi.metadata()
        print(
            f"# privacyIDEA {meta['privacyidea_version']}, {meta['server']}, {meta['database']}, "
            f"phone RSA-{meta['phone_key_bits']}; venv install "
            f"{meta['install_seconds']} s ({'cached' if meta['venv_reused'] else 'this run'}), "
            f"setup {meta['setup_seconds']} s"
        )
        for level in levels:
            c = level
            while True:
                n = max(logins, c)
                n = math.ceil(n / c) * c
                try:
                    r = pi.run(n, c)
                except PushLoginFailed as exc:
                    r = exc.result
                    results.append(r)
                    print(f"# FAILED at c={c}: {r.failures}/{r.logins} logins; {exc}")
                    for err in r.errors[:5]:
                        print(f"#   {err}")
                    for err in r.server_errors[:5]:
                        print(f"#   server log: {err}")
                    figures.append((f"privacyidea_failed_logins_c{c}", float(r.failures)))
                    if c == 1:
                        broken = True
                    if c == 1 or args.no_step_down or c // 2 < 2:
                        break
                    c //= 2
                    print(f"# stepping down to c={c}")
                    continue
                results.append(r)
                figures += [(f"privacyidea_p50_c{c}", r.p50), (f"privacyidea_p99_c{c}", r.p99)]
                if c != level:
                    print(f"# highest concurrency that worked below {level}: {c}")
                break
        meta = pi.metadata()

    print()
    print(f"privacyIDEA {meta['privacyidea_version']} push login round trip (ms), {meta['server']}")
    print(
        f"{'c':>5} {'logins':>6} {'ok':>6} {'fail':>5} {'p50':>8} {'p99':>8} {'mean':>8} "
        f"{'login/s':>7} {'wall_s':>7}  load before -> after  [median per leg]"
    )
    for r in results:
        print(_row(r))
    print(
        f"# tokens enrolled {meta['tokens']} in {meta['enrol_seconds']} s (untimed); "
        f"venv install {meta['install_seconds']} s"
    )
    for metric, value in figures:
        unit = "logins" if "failed" in metric else "ms"
        print(f"BENCH pushauth.{metric} value={value:.1f} unit={unit} goal=>=0")
    return 1 if broken else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as interrupted:
        print(f"interrupted ({interrupted or 'Ctrl-C'}); server stopped", file=sys.stderr)
        sys.exit(130)
