"""Run untrusted Python in a separate, fenced-in process.

Layers, each enough to stop a different escape:
- bubblewrap (``bwrap``): new user, PID, network, IPC, UTS and mount namespaces; the child sees
  /usr read-only, a fresh /proc and /dev, and a small private /tmp and working directory (tmpfs
  of a fixed size, holding its three input files read-only), and no other file of the host; it runs as uid 65534 with an empty environment and dies with its
  parent. When bubblewrap is missing or cannot set up the namespaces the check fails closed:
  nothing runs without it;
- its own session, killed whole at the wall-clock timeout;
- resource limits: CPU seconds, address space, file size (output included), open files,
  and process count;
- a bounded number of sandboxes at once (``set_concurrency``); a run waits for a slot only
  until the caller's deadline, and is killed at that deadline;
- an audit hook installed before the candidate's code runs that refuses writes outside its
  directory, sockets, new processes, signals and native libraries (ctypes).
Output goes to an unlinked file outside the sandbox, which the parent reads back through its own
descriptor (never by a path the child could replace), under the size limit.
"""

from __future__ import annotations

import contextvars
import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, replace

# The child fences itself in before it reads the candidate's code: limits, network namespace,
# unprivileged user, then the audit hook. (No preexec_fn: forking a threaded server and running
# Python between fork and exec is unsafe.)
RUNNER = r'''
import json, os, resource, sys
config = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_CPU, (config["cpu"], config["cpu"] + 1))
resource.setrlimit(resource.RLIMIT_AS, (config["memory"], config["memory"]))
resource.setrlimit(resource.RLIMIT_FSIZE, (config["output"], config["output"]))
resource.setrlimit(resource.RLIMIT_NOFILE, (config["files"], config["files"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NPROC, (config["processes"], config["processes"]))
ROOT = os.path.realpath(os.getcwd())
BLOCKED = {
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
    "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "socket.__new__", "socket.connect",
    "socket.bind", "socket.sendto", "socket.getaddrinfo", "os.setuid", "os.chroot", "pty.spawn",
}
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
               "os.chown", "os.truncate", "shutil.rmtree", "os.utime"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def inside(path):
    try:
        real = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return real == ROOT or real.startswith(ROOT + os.sep)

def hook(event, args):
    if event in BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):
            return
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        if writing and not inside(path):
            raise PermissionError(f"sandbox: write outside its directory: {path}")
    elif event in PATH_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)) and not inside(args[0]):
        raise PermissionError(f"sandbox: {event} outside its directory")

solution = open("solution.py").read()
tests = open("tests.py").read()
sys.addaudithook(hook)
namespace = {"__name__": "solution"}
exec(compile(solution, "solution.py", "exec"), namespace)
exec(compile(tests, "tests.py", "exec"), namespace)
print("sandbox: all tests passed")
'''


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 2
    wall_seconds: float = 5.0
    memory_bytes: int = 512 << 20
    output_bytes: int = 1 << 20
    processes: int = 32
    open_files: int = 64
    shown_output_chars: int = 2000
    # Size of the sandbox's own writable directory and of its /tmp (tmpfs, in memory).
    scratch_bytes: int = 16 << 20


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str
    output: str


_SIGNALS = {int(s) for s in signal.Signals}
# The monotonic time by which the current Verify call must answer; None when unbounded. The
# verifier sets it around its checks (worker threads inherit it from the call's context).
CALL_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("rmesh_sandbox_deadline", default=None)
# Below this much time left a run is not started: it could not finish.
MIN_RUN_SECONDS = 0.1
_slots = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))


def set_concurrency(limit: int) -> None:
    """How many sandboxes may run at once in this process (RMESH_SANDBOX_CONCURRENCY)."""
    global _slots
    _slots = threading.BoundedSemaphore(max(1, limit))
# Where the sandbox sees its directory.
INSIDE = "/work"
SANDBOX_UID = 65534


def _interpreter() -> str:
    """An interpreter under /usr, the only part of the host the sandbox sees."""
    configured = os.environ.get("RMESH_SANDBOX_PYTHON")
    candidates = [configured] if configured else ["/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and os.path.realpath(candidate).startswith("/usr/"):
            return candidate
    return ""


def _bwrap_command(bwrap: str, interpreter: str, workdir: str, status_fd: int, config: dict, scratch_bytes: int) -> list[str]:
    command = [
        bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
        "--setenv", "PATH", "/usr/bin", "--setenv", "HOME", INSIDE, "--setenv", "LANG", "C.UTF-8",
        "--ro-bind", "/usr", "/usr",
    ]
    for name in ("lib", "lib64", "bin", "sbin"):
        if os.path.islink(f"/{name}"):
            command += ["--symlink", os.readlink(f"/{name}"), f"/{name}"]
    command += [
        "--proc", "/proc", "--dev", "/dev",
        "--size", str(scratch_bytes), "--perms", "1777", "--tmpfs", "/tmp",
        "--size", str(scratch_bytes), "--perms", "1777", "--tmpfs", INSIDE,
    ]
    for name in INPUT_FILES:
        command += ["--ro-bind", os.path.join(workdir, name), f"{INSIDE}/{name}"]
    command += [
        "--chdir", INSIDE,
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--json-status-fd", str(status_fd),
        interpreter, "-I", "-S", "-B", "runner.py", json.dumps(config),
    ]
    return command


INPUT_FILES = ("runner.py", "solution.py", "tests.py")


def _unavailable(reason: str) -> Outcome:
    return Outcome(False, f"sandbox unavailable, check not run: {reason}", "")


def run_python_tests(solution: str, tests: str, limits: Limits = Limits(), deadline: float | None = None) -> Outcome:
    """Run ``tests`` against ``solution`` in a sandbox; never past ``deadline`` (default: the
    current call's), and never more than the concurrency limit at once."""
    deadline = CALL_DEADLINE.get() if deadline is None else deadline
    left = None if deadline is None else deadline - time.monotonic()
    if left is not None and left < MIN_RUN_SECONDS:
        return Outcome(False, "not run: the caller's deadline has passed", "")
    slots = _slots
    if not slots.acquire(timeout=left):
        return Outcome(False, "not run: every sandbox slot stayed busy until the caller's deadline", "")
    try:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left < MIN_RUN_SECONDS:
            return Outcome(False, "not run: the caller's deadline has passed", "")
        if left is not None and left < limits.wall_seconds:
            outcome = _run(solution, tests, replace(limits, wall_seconds=left))
            if outcome.reason.startswith("timed out"):
                return Outcome(False, "killed at the caller's deadline", outcome.output)
            return outcome
        return _run(solution, tests, limits)
    finally:
        slots.release()


def probe() -> str:
    """Why the sandbox cannot run here, or "" when it works (a trivial test passes)."""
    outcome = run_python_tests("x = 1", "assert x == 1", Limits(wall_seconds=20.0, cpu_seconds=5), deadline=None)
    return "" if outcome.passed else outcome.reason


def _run(solution: str, tests: str, limits: Limits) -> Outcome:
    bwrap = os.environ.get("RMESH_SANDBOX_BWRAP") or shutil.which("bwrap") or ""
    if not bwrap or not os.access(bwrap, os.X_OK):
        return _unavailable("bubblewrap (bwrap) is not installed")
    interpreter = _interpreter()
    if not interpreter:
        return _unavailable("no python3 under /usr (set RMESH_SANDBOX_PYTHON)")
    workdir = tempfile.mkdtemp(prefix="rmesh-sandbox-")
    status_read, status_write = os.pipe()
    # Outside the sandbox and already unlinked: the child writes to it through the descriptor it
    # inherits and can never swap it for a link, a FIFO or a directory.
    output = tempfile.TemporaryFile()
    try:
        root = pathlib.Path(workdir)
        for name, text in zip(INPUT_FILES, (RUNNER, solution, tests), strict=True):
            (root / name).write_text(text)
            (root / name).chmod(0o644)
        root.chmod(0o755)  # bubblewrap, started as nobody, binds these read-only
        # As root, bubblewrap itself runs as nobody (setpriv switches before it starts): the
        # sandbox's uid then maps to an unprivileged user outside too, whose process limit the
        # kernel enforces (it never limits root's), so a fork bomb stops at the limit.
        as_nobody: list[str] = []
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if not setpriv:
                return _unavailable("setpriv (util-linux) is needed to start bubblewrap unprivileged")
            as_nobody = [setpriv, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups", "--"]
        config = {
            "cpu": limits.cpu_seconds,
            "memory": limits.memory_bytes,
            "output": limits.output_bytes,
            "files": limits.open_files,
            "processes": limits.processes,
        }
        try:
            process = subprocess.Popen(
                as_nobody + _bwrap_command(bwrap, interpreter, workdir, status_write, config, limits.scratch_bytes),
                cwd=workdir,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                pass_fds=(status_write,),
            )
        except OSError as exc:
            return _unavailable(f"cannot start bubblewrap ({exc.strerror or exc})")
        os.close(status_write)
        status_write = -1
        try:
            code = process.wait(timeout=limits.wall_seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            code = None
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        with os.fdopen(status_read, "rb") as status:
            status_read = -1
            started = b'"child-pid"' in status.read(65536)
        output_size = os.fstat(output.fileno()).st_size
        output.seek(0)
        shown = output.read(limits.shown_output_chars).decode("utf-8", errors="replace")
    finally:
        output.close()
        for fd in (status_read, status_write):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
    if not started:
        # bubblewrap could not build the sandbox (no user namespaces, a seccomp profile that
        # forbids them): say so; nothing of the candidate ran.
        why = next((line for line in shown.splitlines() if line.startswith("bwrap:")), "bwrap could not start")
        return _unavailable(why[:200])
    if code is not None and code > 128 and code - 128 in _SIGNALS:
        code = -(code - 128)  # bubblewrap reports a child killed by signal N as 128 + N
    return _judge(code, timed_out, shown, output_size, limits)


def _judge(code: int | None, timed_out: bool, output: str, output_size: int, limits: Limits) -> Outcome:
    if output_size >= limits.output_bytes:
        # Python ignores SIGXFSZ, so the write fails with EFBIG rather than killing the process.
        return Outcome(False, f"output larger than {limits.output_bytes} bytes (truncated)", output)
    if timed_out:
        return Outcome(False, f"timed out after {limits.wall_seconds:.1f}s of wall clock", output)
    if code == 0:
        return Outcome(True, "all tests passed", output)
    if code is not None and code < 0:
        sig = signal.Signals(-code)
        reasons = {
            signal.SIGXCPU: f"CPU time limit of {limits.cpu_seconds}s exceeded",
            signal.SIGKILL: "killed at a resource limit",
            signal.SIGXFSZ: f"output or file larger than {limits.output_bytes} bytes",
            signal.SIGSEGV: "crashed (memory limit or native fault)",
        }
        return Outcome(False, reasons.get(sig, f"killed by {sig.name}"), output)
    blocked = [line for line in output.splitlines() if "PermissionError: sandbox:" in line]
    if blocked:
        return Outcome(False, blocked[-1].split("PermissionError: ")[-1].strip(), output)
    last = next((line for line in reversed(output.splitlines()) if line.strip()), "tests failed")
    return Outcome(False, f"tests failed: {last.strip()[:300]}", output)
