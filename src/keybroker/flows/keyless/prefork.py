"""Several key-server processes behind one listener (``keybroker keyserver --processes N``).

Why: a key server's per-request work (TLS records, framing, admission, replies) is
Python, and one process runs it under one GIL. For RSA that is a small share of each
request; for ECDSA, whose signature costs about as much as that Python, one process
tops out well below what the cores can sign (measured in ``docs/benchmarks.md``,
"The key server"). N processes, each a whole :class:`~.keyserver.KeyServer` with its
own event loop, keys, grants and executor, use N cores.

How: the supervisor (the process that was started) binds the listening socket,
starts the N workers (``multiprocessing`` *spawn*: fresh interpreters, nothing
inherited but the configuration and the environment), and accepts connections
itself, handing each accepted socket to the next worker in turn over a Unix socket
pair (``SCM_RIGHTS``). Round robin, so a handful of long-lived edge connections is
spread evenly, which ``SO_REUSEPORT``'s hashing does not promise. The TLS handshake
and everything after it happen in the worker; the supervisor only accepts.

Signals: SIGHUP is passed on to every worker (each reloads its keys and grants);
SIGTERM or SIGINT stops accepting, passes SIGTERM on, and waits for the workers to
finish what they admitted (``shutdown_grace``). Workers ignore SIGINT (a Ctrl-C in a
terminal reaches the whole process group; the supervisor decides). If a worker dies,
the supervisor stops the others and raises :class:`WorkerDied`: a key server
missing a share of its capacity should be restarted whole by the service manager,
not limp on.

Metrics: each worker serves its own ``/healthz`` and ``/metrics`` (worker *i* on
``metrics_port + i``, or any free port if ``metrics_port`` is 0); the ready line
lists them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from keybroker.errors import ConfigurationError, KeybrokerError
from keybroker.flows.keyless.keyserver import (
    KeyServerConfig,
    build_key_server,
    format_address,
    serve_until_stopped,
)

__all__ = ["WorkerDied", "run_supervisor"]

_log = logging.getLogger("keybroker.keyless.keyserver")

#: Seconds a worker may take to load its keys and report ready.
READY_TIMEOUT: Final = 120.0
#: Seconds past ``shutdown_grace`` the supervisor waits before killing a worker.
KILL_AFTER: Final = 5.0
#: What the supervisor sends with each passed socket (the message must not be empty).
_CONNECTION: Final = b"c"


class WorkerDied(KeybrokerError):
    """A key-server process exited while the supervisor was serving."""


# -- the worker ------------------------------------------------------------------------------


def worker_main(config: KeyServerConfig, channel: socket.socket, index: int) -> None:
    """Body of worker ``index`` (a spawned process): serve the sockets ``channel`` brings."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.getLevelName(config.log_level.upper()),
        format=f"%(asctime)s %(name)s[{index}] %(levelname)s %(message)s",
        force=True,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_worker(config, channel, index))
    except ConfigurationError as exc:
        _log.error("key-server process %d: configuration error: %s", index, exc)
        raise SystemExit(2) from None


async def _worker(config: KeyServerConfig, channel: socket.socket, index: int) -> None:
    loop = asyncio.get_running_loop()
    server = build_key_server(config)
    stop = asyncio.Event()

    def receive() -> None:
        try:
            message, fds, _flags, _address = socket.recv_fds(channel, 64, 64)
        except BlockingIOError:
            return
        except OSError:
            message, fds = b"", []
        for fd in fds:
            server.adopt(socket.socket(fileno=fd))
        if not message and not fds:  # the supervisor is gone: nothing more will come
            loop.remove_reader(channel.fileno())
            stop.set()

    async def begin() -> str:
        await server.start_without_listening()
        if config.metrics_port is None:
            return "-"
        port = config.metrics_port + index if config.metrics_port else 0
        return format_address(await server.start_metrics(config.metrics_host, port))

    def ready(metrics: str) -> None:
        channel.sendall(f"ready {metrics}\n".encode())
        channel.setblocking(False)
        loop.add_reader(channel.fileno(), receive)

    try:
        await serve_until_stopped(
            server, config, begin, ready=ready, stop=stop, stop_signals=(signal.SIGTERM,)
        )
    finally:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(channel.fileno())
        channel.close()


# -- the supervisor --------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: multiprocessing.process.BaseProcess
    channel: socket.socket
    metrics: str | None = None

    async def wait_ready(self) -> None:
        """Read the worker's ready line; ConfigurationError if it exits first."""
        loop = asyncio.get_running_loop()
        line = b""
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                while not line.endswith(b"\n"):
                    chunk = await loop.sock_recv(self.channel, 256)
                    if not chunk:
                        break
                    line += chunk
        except TimeoutError:
            raise ConfigurationError(
                f"key-server process {self.index} did not start in {READY_TIMEOUT:.0f} s"
            ) from None
        text = line.decode(errors="replace").strip()
        if not text.startswith("ready "):
            await loop.run_in_executor(None, self.process.join, 5.0)
            raise ConfigurationError(
                f"key-server process {self.index} exited before serving (status "
                f"{self.process.exitcode}; its log says why)"
            )
        metrics = text.removeprefix("ready ")
        self.metrics = None if metrics == "-" else metrics

    def hand(self, conn: socket.socket) -> None:
        socket.send_fds(self.channel, [_CONNECTION], [conn.fileno()])


async def run_supervisor(
    config: KeyServerConfig,
    *,
    ready: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``config`` with ``config.processes`` worker processes until SIGTERM/SIGINT
    (or ``stop``). Raises :class:`WorkerDied` if a worker exits meanwhile."""
    config.settings()  # every setting checked before anything starts
    host, port = config.listen_address()
    try:
        listener = socket.create_server(
            (host, port),
            family=socket.AF_INET6 if ":" in host else socket.AF_INET,
            backlog=1024,
        )
    except OSError as exc:
        raise ConfigurationError(f"listen: cannot listen on {host}:{port} ({exc})") from None
    listener.setblocking(False)
    supervisor = _Supervisor(config, listener, stop if stop is not None else asyncio.Event())
    try:
        await supervisor.run(ready)
    finally:
        listener.close()


class _Supervisor:
    def __init__(
        self, config: KeyServerConfig, listener: socket.socket, stop: asyncio.Event
    ) -> None:
        self.config = config
        self.listener = listener
        self.stop = stop
        self.loop = asyncio.get_running_loop()
        self.workers: list[_Worker] = []
        self.dead: list[_Worker] = []
        self.turn = 0

    async def run(self, ready: Callable[[str], None]) -> None:
        loop, handled = self.loop, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        try:
            await self._start_workers()
            loop.add_reader(self.listener.fileno(), self._accept)
            loop.add_signal_handler(signal.SIGTERM, self.stop.set)
            loop.add_signal_handler(signal.SIGINT, self.stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._hangup)
            bound = format_address(self.listener.getsockname()[:2])
            line = f"listening on {bound}"
            metrics = [worker.metrics for worker in self.workers if worker.metrics]
            if metrics:
                line += f" metrics on {','.join(metrics)}"
            _log.info("key server on %s: %d processes", bound, len(self.workers))
            ready(line)
            await self.stop.wait()
            _log.info("stopping %d key-server processes", len(self.workers))
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self.listener.fileno())
            await _stop_workers(self.workers, self.config.shutdown_grace + KILL_AFTER)
        if self.dead:
            worker = self.dead[0]
            raise WorkerDied(
                f"key-server process {worker.index} exited (status "
                f"{worker.process.exitcode}); the other {len(self.workers) - 1} were stopped"
            )

    async def _start_workers(self) -> None:
        spawn = multiprocessing.get_context("spawn")
        for index in range(self.config.processes):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            process = spawn.Process(
                target=worker_main, args=(self.config, theirs, index), name=f"keyserver-{index}"
            )
            process.start()
            theirs.close()
            ours.setblocking(False)
            self.workers.append(_Worker(index, process, ours))
        await asyncio.gather(*(worker.wait_ready() for worker in self.workers))
        for worker in self.workers:
            worker.channel.setblocking(True)  # small sends; a full buffer is worth a wait
            self.loop.add_reader(worker.process.sentinel, self._exited, worker)

    def _accept(self) -> None:
        while True:
            try:
                conn, _peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: log, and let the next readiness retry
                _log.warning("accept failed: %s", exc)
                return
            with conn:
                self._hand(conn)

    def _hand(self, conn: socket.socket) -> None:
        """Give ``conn`` to the next worker in turn (skipping one that cannot take it)."""
        for _ in range(len(self.workers)):
            worker = self.workers[self.turn % len(self.workers)]
            self.turn += 1
            try:
                worker.hand(conn)
                return
            except OSError as exc:
                _log.warning("could not hand a connection to process %d: %s", worker.index, exc)

    def _exited(self, worker: _Worker) -> None:
        self.loop.remove_reader(worker.process.sentinel)
        if not self.stop.is_set():
            self.dead.append(worker)
            self.stop.set()

    def _hangup(self) -> None:
        _log.info("SIGHUP: reloading keys and grants in %d processes", len(self.workers))
        for worker in self.workers:
            _signal(worker, signal.SIGHUP)


def _signal(worker: _Worker, number: signal.Signals) -> None:
    if worker.process.pid is not None and worker.process.exitcode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.process.pid, number)


async def _stop_workers(workers: list[_Worker], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    for worker in workers:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(worker.process.sentinel)
        _signal(worker, signal.SIGTERM)
    for worker in workers:
        await loop.run_in_executor(None, worker.process.join, timeout)
        if worker.process.exitcode is None:
            _log.warning("key-server process %d did not stop: killing it", worker.index)
            worker.process.kill()
            await loop.run_in_executor(None, worker.process.join, KILL_AFTER)
        worker.channel.close()
