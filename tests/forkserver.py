"""kdpipe processes that start in milliseconds instead of seconds, for the end-to-end tests.

Every kdpipe process spends about 6 s importing torch (and torch._dynamo, which any
optimizer pulls in) before it does anything, and the end-to-end tests start well over a
hundred of them. A fork server imports kdpipe once; each command is a child forked from
it that takes the caller's stdin/stdout/stderr, working folder, environment, session and
arguments, applies the caller's preparation (a resource limit, a signal disposition) and
runs `cli.main`, the console script's entry point. So each command is still an OS
process of its own, killed, signalled, limited and exiting as a fresh one would, running
exactly the given command line; only the imports are shared. Starting from nothing is
tested where it is the point: the console script (test_cli), torchrun's ranks
(test_distributed), glibc's environment (test_host).

    server = ForkServer.start(folder, env)  # one per pytest worker: conftest's fork_server()
    child = server.popen(["cache-teacher", ...], cwd, env, start_new_session=True)
    child.communicate(timeout=...); child.kill(); child.returncode
    install_shim(folder, server.socket_path)  # a `kdpipe` executable for shell scripts
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

SHIM = """#!{python} -S
import os, pickle, signal, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect({socket_path!r})
request = {{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ), "session": False, "prepare": None}}
socket.send_fds(sock, [pickle.dumps(request)], [0, 1, 2])
sock.shutdown(socket.SHUT_WR)
lines = b"".join(iter(lambda: sock.recv(64), b"")).split()
status = int(lines[1]) if len(lines) > 1 else 70
if status < 0:
    signal.signal(-status, signal.SIG_DFL)
    os.kill(os.getpid(), -status)
sys.exit(status)
"""


def install_shim(folder: Path, socket_path: Path) -> Path:
    """Write an executable `kdpipe` into `folder` that runs its command through the server
    at `socket_path` and exits as the command did."""
    shim = folder / "kdpipe"
    shim.write_text(SHIM.format(python=sys.executable, socket_path=str(socket_path)))
    shim.chmod(0o755)
    return shim


# --- the server ----------------------------------------------------------------------------


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    chunks, fds = [], []
    while True:
        data, received, _, _ = socket.recv_fds(connection, 1 << 20, 3)
        fds += received
        if not data:
            return pickle.loads(b"".join(chunks)), fds
        chunks.append(data)


def _become(request: dict, fds: list[int], server_sockets: list[socket.socket], ready: int) -> None:
    """In the forked child: become the command and run it; never returns. The server's
    socket and its connections to callers are let go (detached, so that no object closes
    their numbers later, when the command may have reused them): a caller knows its
    command has ended when its connection closes. Nothing else is closed, since imported
    libraries may own descriptors."""
    for server_socket in server_sockets:
        os.close(server_socket.detach())
    if request["session"]:
        os.setsid()
    os.close(ready)  # the caller may now signal the process (group)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request["prepare"] is not None:
        request["prepare"]()
    sys.argv = ["kdpipe", *request["argv"]]
    status = 1
    try:
        import cli

        cli.main()
        status = 0
    except SystemExit as exit:
        status = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException:  # a crash reads as it would from the console script
        traceback.print_exc()
    # End as the interpreter would (threads joined, exit handlers run, output flushed), but
    # without tearing every module down: that touches each object the server imported and
    # so copies its pages (copy-on-write), which cost about 2.5 s a command.
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _report(connection: socket.socket, pid: int, open_connections: set[socket.socket], lock: threading.Lock) -> None:
    """Send the child's pid now and its exit status (Popen's returncode) when it ends."""
    try:
        connection.sendall(f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    except OSError:  # the caller went away
        pass
    finally:
        with lock:
            open_connections.discard(connection)
            connection.close()


def serve(socket_path: str) -> None:
    import torch._dynamo  # noqa: F401 (what every training command imports first)

    import cli  # noqa: F401
    from pipeline import audit, bench, cache, order, quickstart, train  # noqa: F401
    with contextlib.suppress(ImportError):  # what train-student imports at its first epoch, when installed
        import torch.utils.tensorboard  # noqa: F401
    # not timm: it imports huggingface_hub, which reads HF_HUB_CACHE and HF_HUB_OFFLINE once,
    # at import, and tests give each command a hub cache of its own

    gc.freeze()  # what is imported stays out of the children's collections (and their pages shared)
    server = socket.socket(socket.AF_UNIX)
    server.bind(socket_path)
    server.listen(64)
    print("ready", flush=True)
    open_connections: set[socket.socket] = set()
    lock = threading.Lock()  # connections are closed by the reporting threads
    while True:
        connection, _ = server.accept()
        request, fds = _receive(connection)
        waiting, ready = os.pipe()
        with lock:
            open_connections.add(connection)
            pid = os.fork()
            if pid == 0:
                os.close(waiting)
                _become(request, fds, [server, *open_connections], ready)
        for fd in (ready, *fds):
            os.close(fd)
        os.read(waiting, 1)  # until the child has its session: its pid is then what the caller signals
        os.close(waiting)
        threading.Thread(target=_report, args=(connection, pid, open_connections, lock), daemon=True).start()


# --- preparations: what a test's preexec_fn did, picklable -----------------------------------


def limit_file_size(size: int) -> None:
    """No file the command writes may grow past `size` bytes: a write past it fails with
    EFBIG, as on a full disk (SIGXFSZ ignored, so the write fails instead of the process)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def default_sigint() -> None:
    """SIGINT with its default meaning for a program (Python's KeyboardInterrupt), as in a
    terminal, whatever the server inherited."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


# --- the client ----------------------------------------------------------------------------


class Forked:
    """A kdpipe command forked by the server, used like subprocess.Popen with text pipes."""

    def __init__(self, socket_path: Path, request: dict):
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        self._socket = socket.socket(socket.AF_UNIX)
        self._socket.connect(str(socket_path))
        with open(os.devnull, "rb") as stdin:
            socket.send_fds(self._socket, [pickle.dumps(request)], [stdin.fileno(), out_write, err_write])
        self._socket.shutdown(socket.SHUT_WR)
        os.close(out_write)
        os.close(err_write)
        self._buffers = {out_read: bytearray(), err_read: bytearray(), self._socket.fileno(): bytearray()}
        self._open = set(self._buffers)
        self._out, self._err = out_read, err_read
        self.args = request["argv"]
        self.returncode: int | None = None
        self.pid = int(self._read_line())

    def _read_line(self) -> bytes:
        buffer = self._buffers[self._socket.fileno()]
        while b"\n" not in buffer:
            chunk = self._socket.recv(64)
            if not chunk:
                raise RuntimeError("the fork server went away")
            buffer += chunk
        line, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        return line

    def _pump(self, deadline: float | None) -> bool:
        """Read the pipes and the status until all are closed or `deadline`; True if done."""
        with selectors.DefaultSelector() as selector:
            for fd in self._open:
                selector.register(fd, selectors.EVENT_READ)
            while self._open:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                events = selector.select(timeout)
                if not events and timeout is not None and time.monotonic() >= deadline:
                    return False
                for key, _ in events:
                    chunk = os.read(key.fd, 1 << 16)
                    if chunk:
                        self._buffers[key.fd] += chunk
                    else:
                        selector.unregister(key.fd)
                        self._open.discard(key.fd)
        if self.returncode is None:
            status = bytes(self._buffers[self._socket.fileno()]).strip()
            self.returncode = int(status) if status else -signal.SIGKILL
            for fd in (self._out, self._err):
                os.close(fd)
            self._socket.close()
        return True

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """(stdout, stderr) once the command has ended; TimeoutExpired after `timeout`
        seconds, after which communicate may be called again, as with Popen."""
        if not self._pump(None if timeout is None else time.monotonic() + timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._buffers[self._out].decode(), self._buffers[self._err].decode()

    def wait(self, timeout: float | None = None) -> int:
        self.communicate(timeout)
        return self.returncode

    def poll(self) -> int | None:
        self._pump(time.monotonic())
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """A running fork server and the socket it listens on."""

    def __init__(self, process: subprocess.Popen, socket_path: Path):
        self.process, self.socket_path = process, socket_path

    @classmethod
    def start(cls, folder: Path, env: dict) -> ForkServer:
        socket_path = folder / "socket"
        process = subprocess.Popen([sys.executable, "-m", "tests.forkserver", str(socket_path)],
                                   cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE, text=True)
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the fork server did not start (exit {process.wait()})")
        return cls(process, socket_path)

    def popen(self, args, cwd: Path, env: dict, start_new_session: bool = False,
              prepare: Callable[[], None] | None = None) -> Forked:
        """Start `kdpipe ARGS`; `prepare` (a picklable callable) runs in the child first,
        as Popen's preexec_fn would."""
        request = {"argv": [str(a) for a in args], "cwd": str(cwd), "env": dict(env), "session": start_new_session,
                   "prepare": prepare}
        return Forked(self.socket_path, request)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


if __name__ == "__main__":
    serve(sys.argv[1])
