"""Run untrusted Python in a separate, fenced-in process.

Layers, each enough to stop a different escape:
- its own process group, killed whole at the wall-clock timeout;
- resource limits: CPU seconds, address space, file size (output included), open files,
  and process count;
- a fresh network namespace when the verifier runs as root (no interfaces, no network), and an
  unprivileged user (nobody) when the interpreter is reachable by it;
- a private temporary directory as working directory and home, removed afterwards;
- an audit hook installed before the candidate's code runs that refuses writes outside that
  directory, sockets, new processes, signals and native libraries (ctypes).
Output is captured to a file under the size limit and truncated when read back.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass

NOBODY = 65534

# The child fences itself in before it reads the candidate's code: limits, network namespace,
# unprivileged user, then the audit hook. (No preexec_fn: forking a threaded server and running
# Python between fork and exec is unsafe.)
RUNNER = r'''
import ctypes, json, os, resource, sys
config = json.loads(sys.argv[1])
if os.geteuid() == 0:
    ctypes.CDLL(None, use_errno=True).unshare(0x40000000)
resource.setrlimit(resource.RLIMIT_CPU, (config["cpu"], config["cpu"] + 1))
resource.setrlimit(resource.RLIMIT_AS, (config["memory"], config["memory"]))
resource.setrlimit(resource.RLIMIT_FSIZE, (config["output"], config["output"]))
resource.setrlimit(resource.RLIMIT_NOFILE, (config["files"], config["files"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if config["drop"]:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
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


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str
    output: str


def _interpreter() -> str:
    """Debian's interpreter where it exists: an unprivileged user can run it."""
    configured = os.environ.get("RMESH_SANDBOX_PYTHON")
    if configured:
        return configured
    for candidate in ("/usr/bin/python3", shutil.which("python3") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    import sys

    return sys.executable


def _reachable_by_nobody(path: str) -> bool:
    """True when every directory on the way to ``path`` lets others through."""
    current = pathlib.Path(os.path.realpath(path))
    for parent in [*current.parents][::-1]:
        if not parent.stat().st_mode & 0o001:
            return False
    return bool(current.stat().st_mode & 0o005 == 0o005)


def run_python_tests(solution: str, tests: str, limits: Limits = Limits()) -> Outcome:
    interpreter = _interpreter()
    drop = os.geteuid() == 0 and _reachable_by_nobody(interpreter)
    workdir = tempfile.mkdtemp(prefix="rmesh-sandbox-")
    try:
        root = pathlib.Path(workdir)
        (root / "solution.py").write_text(solution)
        (root / "tests.py").write_text(tests)
        (root / "runner.py").write_text(RUNNER)
        if drop:
            for path in [root, *root.iterdir()]:
                os.chown(path, NOBODY, NOBODY)
        output_path = root / "output.txt"
        with open(output_path, "wb") as output:
            config = {
                "cpu": limits.cpu_seconds,
                "memory": limits.memory_bytes,
                "output": limits.output_bytes,
                "files": limits.open_files,
                "processes": limits.processes,
                "drop": drop,
            }
            process = subprocess.Popen(
                [interpreter, "-I", "-S", "-B", "runner.py", json.dumps(config)],
                cwd=workdir,
                env={"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"},
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
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
        output_size = output_path.stat().st_size
        with open(output_path, "rb") as handle:
            shown = handle.read(limits.shown_output_chars).decode("utf-8", errors="replace")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _judge(code, timed_out, shown, output_size, limits)


def _judge(code: int | None, timed_out: bool, output: str, output_size: int, limits: Limits) -> Outcome:
    if output_size >= limits.output_bytes:
        # Python ignores SIGXFSZ, so the write fails with EFBIG rather than killing the process.
        return Outcome(False, f"output larger than {limits.output_bytes} bytes (truncated)", output)
    if timed_out:
        return Outcome(False, f"timed out after {limits.wall_seconds:.0f}s of wall clock", output)
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
