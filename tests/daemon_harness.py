"""Helpers for the daemon tests: raw-Redis producers and readers, stream checks, daemon processes.

Producers and readers use plain redis commands exactly as docs/protocol.md shows, so the tests
exercise the wire protocol rather than the client library.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from helix_daemon.wire import protocol as p

REPO = Path(__file__).resolve().parents[1]


def enqueue(client: redis.Redis, prefix: str, queue: str, body: dict[str, Any] | str | bytes,
            request_id: str | None = None, **extra: str | bytes) -> str:
    """``XADD <queue> * v 1 [id <id>] body <json>``; returns the entry id."""
    raw = body if isinstance(body, str | bytes) else json.dumps(body)
    fields: dict[str, str | bytes] = {"v": "1", "body": raw, **extra}
    if request_id is not None:
        fields["id"] = request_id
    return client.xadd(p.queue_key(queue, prefix), fields).decode()


def read_raw(client: redis.Redis, prefix: str, request_id: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in client.xrange(p.out_key(request_id, prefix))]


@dataclass
class Result:
    """A request's stream, checked: tokens in order, and its single terminal event."""

    ids: list[int]
    text: str
    terminal: p.Event
    events: list[p.Event]

    @property
    def attempts_seen(self) -> set[int]:
        return {e.att for e in self.events}


def check_stream(events: list[p.Event]) -> Result:
    """Assert the protocol's stream invariants and return the assembled output."""
    assert events, "empty stream"
    assert [e.seq for e in events] == list(range(len(events))), "seq must be gap-free from 0"
    terminals = [e for e in events if p.is_terminal(e)]
    assert len(terminals) == 1 and p.is_terminal(events[-1]), "exactly one terminal event, last"
    ids: list[int] = []
    text = ""
    for event in events[:-1]:
        assert isinstance(event, p.TokenEvent)
        assert event.off == len(ids), f"offset {event.off} != {len(ids)} (duplicate or gap)"
        ids += event.ids
        text += event.text
    atts = [e.att for e in events]
    assert atts == sorted(atts), "a later attempt's event precedes an earlier one's"
    return Result(ids, text, events[-1], events)


def read_result(client: redis.Redis, prefix: str, request_id: str) -> Result:
    return check_stream([p.decode_event(f) for f in read_raw(client, prefix, request_id)])


def is_finished(client: redis.Redis, prefix: str, request_id: str) -> bool:
    state = client.hget(p.meta_key(request_id, prefix), "state")
    return state in (b"done", b"error", b"cancelled")


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str,
               interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def wait_all_finished(client: redis.Redis, prefix: str, request_ids: Iterable[str],
                      timeout_s: float) -> None:
    ids = list(request_ids)
    wait_until(lambda: all(is_finished(client, prefix, r) for r in ids), timeout_s,
               f"{len(ids)} requests to finish")


def greedy_reference(model: str, prompts: list[str], max_tokens: int,
                     dtype: str = "float64") -> list[tuple[list[int], str]]:
    """Uninterrupted in-process output of the same engine the daemon runs (greedy)."""
    with one_torch_thread():
        return _greedy(model, prompts, max_tokens, dtype)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models on two shared cores run ~10x faster on one intra-op thread than on two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _greedy(model: str, prompts: list[str], max_tokens: int,
            dtype: str) -> list[tuple[list[int], str]]:
    from helix_daemon.engine.config import EngineConfig
    from helix_daemon.engine.engine import Engine
    from scheduler.params import RequestParams, SamplingParams

    engine = Engine.from_config(EngineConfig(model=model, device="cpu", dtype=dtype,
                                             num_kv_blocks=512))
    params = RequestParams(max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0),
                           ignore_eos=True)
    out: dict[str, tuple[list[int], str]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
        out[str(i)] = ([], "")
    while engine.has_unfinished():
        for o in engine.step():
            ids, text = out[o.request_id]
            out[o.request_id] = (ids + list(o.new_token_ids), text + o.text_delta)
    return [out[str(i)] for i in range(len(prompts))]


def base_env() -> dict[str, str]:
    """This environment without HELIX_* settings, torch limited to one thread (two cores are
    shared by several daemons and the test itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIX_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO),
               TOKENIZERS_PARALLELISM="false")
    return env


def daemon_env(redis_url: str, prefix: str, queue: str, model: str, daemon_id: str,
               **settings: object) -> dict[str, str]:
    """Environment of a daemon subprocess: HELIX_* settings, one CPU thread for torch."""
    env = base_env()
    base: dict[str, object] = dict(redis_url=redis_url, key_prefix=prefix, queue=queue,
                                   model=model, daemon_id=daemon_id, device="cpu",
                                   dtype="float64", num_kv_blocks=256, log_json="true",
                                   lease_ms=1500, reclaim_interval_s=0.2,
                                   heartbeat_interval_s=0.5,
                                   # an engine thread starts in a fraction of an engine
                                   # process's seconds; tests of the process ask for it
                                   engine_process="false")
    base.update(settings)
    env.update({f"HELIX_{k.upper()}": str(v) for k, v in base.items()})
    return env


def engine_process_of(daemon_pid: int) -> int:
    """Pid of a daemon's engine process (Linux ``/proc``): its spawned child."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        # the field after the parenthesised command name: state, then the parent's pid
        if int(stat.rsplit(")", 1)[1].split()[1]) == daemon_pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    assert len(found) == 1, f"daemon {daemon_pid} has engine processes {found}"
    return found[0]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class DaemonProcess:
    """``python -m helix_daemon.daemon`` as a real child process, logs in a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        # A session of its own: signals sent to its process group reach no test process.
        self.proc = subprocess.Popen([sys.executable, "-m", "helix_daemon.daemon"], env=env,
                                     cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def signal_group(self, sig: signal.Signals) -> None:
        """Signal the daemon and its engine process, as systemd's stop or Ctrl-C does."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout_s)

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.kill()
        self._log.close()


class ThreadDaemon:
    """A ``Daemon`` on its own event loop in a background thread, started by
    ``run_in_background`` as a program that embeds one would start it.

    Blocking callers (``HelixClient``, ``cli.main`` with its own ``asyncio.run``, synchronous
    tests that look at the engine) cannot share the daemon's loop; a thread with a private loop
    keeps the whole stack in one process without mocking anything. ``start()`` returns once the
    daemon serves and has registered; ``stop()`` takes the SIGTERM path (drain, unregister).
    """

    def __init__(self, config: Any, engine: Any) -> None:
        self.config = config
        self.engine = engine
        self.daemon: Any = None
        self.exit_code: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()  # serving, or failed to start (then _start_error)
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"daemon-{config.daemon_id}",
                                        daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        from helix_daemon.server.daemon import Daemon
        from helix_daemon.server.run import redis_client, run_in_background

        client = redis_client(self.config.redis_url)
        self._loop = asyncio.get_running_loop()
        self.daemon = Daemon(self.config, self.engine, client)
        try:
            try:
                task = await run_in_background(self.daemon)
            except BaseException as e:  # start() raises it in the test's thread
                self._start_error = e
                raise
            finally:
                self._started.set()
            self.exit_code = await task
        finally:
            await client.aclose()

    def start(self, timeout_s: float = 30) -> ThreadDaemon:
        """Run the daemon; return once it serves and its heartbeat key exists (registered)."""
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"daemon {self.config.daemon_id} did not start in {timeout_s}s")
        if self._start_error is not None:
            raise RuntimeError(f"daemon {self.config.daemon_id} did not start") \
                from self._start_error
        beat = p.daemon_key(self.config.daemon_id, self.config.key_prefix)
        client = redis.Redis.from_url(self.config.redis_url)
        try:
            wait_until(lambda: bool(client.exists(beat)), timeout_s, "the daemon's heartbeat")
        finally:
            client.close()
        return self

    def kv_blocks_used(self) -> int:
        return self.daemon.engine_stats.kv_blocks_used

    def stop(self, timeout_s: float = 30) -> int | None:
        """Stop like SIGTERM and return the exit code; a daemon that does not stop in time fails
        the test loudly, with every thread's stack and every task's."""
        if self._thread.is_alive() and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # it may stop on its own meanwhile
                self._loop.call_soon_threadsafe(self.daemon.request_stop)
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            faulthandler.dump_traceback(all_threads=True)
            for task in asyncio.all_tasks(self._loop):
                task.print_stack()
            raise TimeoutError(f"daemon {self.config.daemon_id} did not stop in {timeout_s}s")
        return self.exit_code


def start_thread_daemon(model: str, redis_url: str, prefix: str,
                        **overrides: Any) -> ThreadDaemon:
    """Load ``model`` on CPU with a small KV pool and serve the ``default`` queue of ``prefix``
    in a thread (for client and CLI tests, which need one module-wide daemon)."""
    from helix_daemon.config import DaemonConfig
    from helix_daemon.engine_host.load import load_engine
    from helix_daemon.logs import configure_logging

    # Before the daemon binds its logger: its lines must go to stderr, never into the stdout
    # the CLI tests parse.
    configure_logging(json=True, level="WARNING")
    settings: dict[str, Any] = dict(model=model, redis_url=redis_url, key_prefix=prefix,
                                    daemon_id=f"{prefix}-d0", device="cpu", dtype="float32",
                                    num_kv_blocks=256, max_num_seqs=16,
                                    heartbeat_interval_s=0.2, drain_timeout_s=5.0)
    settings.update(overrides)
    config = DaemonConfig(**settings)
    return ThreadDaemon(config, load_engine(config.engine_config())).start()


@contextlib.contextmanager
def serving_thread_daemon(model: str, redis_url: str, prefix: str,
                          **overrides: Any) -> Iterator[ThreadDaemon]:
    """``start_thread_daemon`` for a module fixture: stopped afterwards and its keys deleted."""
    daemon = start_thread_daemon(model, redis_url, prefix, **overrides)
    try:
        yield daemon
    finally:
        daemon.stop()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)


# A "zygote" pays the torch/transformers import once and forks each daemon from it, so a test
# can start (and kill -9) dozens of real daemon processes on two cores. Children are ordinary
# processes running ``helix_daemon.server.run.serve``; the zygote reaps them and reports exit codes.
_ZYGOTE = r"""
import json, os, select, sys
import helix_daemon.server.run, helix_daemon.engine.engine  # the expensive imports, paid once


def spawn(spec):
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ.update(spec["env"])
        from helix_daemon.config import DaemonConfig
        code = helix_daemon.server.run.serve(DaemonConfig.from_env())
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


while True:
    if select.select([sys.stdin], [], [], 0.05)[0]:
        line = sys.stdin.readline()
        if not line:
            break
        print("pid", spawn(json.loads(line)), flush=True)
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        print("exit", pid, os.waitstatus_to_exitcode(status), flush=True)
"""


class Zygote:
    """Forks daemon processes from one pre-imported Python (see ``_ZYGOTE``)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], env=env, cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.exits: dict[int, int] = {}
        self._pids: list[int] = []
        self._answers: list[int] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            kind, pid, *rest = line.split()
            with self._cond:
                if kind == "pid":
                    self._answers.append(int(pid))
                else:
                    self.exits[int(pid)] = int(rest[0])
                self._cond.notify_all()

    def spawn(self, env: dict[str, str], log_path: Path) -> ForkedDaemon:
        assert self.proc.stdin is not None
        with self._cond:
            self.proc.stdin.write(json.dumps({"env": env, "log": str(log_path)}) + "\n")
            self.proc.stdin.flush()
            if not self._cond.wait_for(lambda: self._answers, 60):
                raise TimeoutError("zygote did not fork")
            pid = self._answers.pop(0)
        self._pids.append(pid)
        return ForkedDaemon(self, pid, log_path)

    def wait_exit(self, pid: int, timeout_s: float) -> int:
        with self._cond:
            if not self._cond.wait_for(lambda: pid in self.exits, timeout_s):
                raise TimeoutError(f"daemon {pid} did not exit within {timeout_s}s")
            return self.exits[pid]

    def close(self) -> None:
        for pid in self._pids:
            if pid not in self.exits:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


class ForkedDaemon:
    """One daemon process forked by a ``Zygote``."""

    def __init__(self, zygote: Zygote, pid: int, log_path: Path) -> None:
        self.zygote = zygote
        self.pid = pid
        self.log_path = log_path

    def is_alive(self) -> bool:
        return self.pid not in self.zygote.exits

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout_s: float) -> int:
        return self.zygote.wait_exit(self.pid, timeout_s)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
