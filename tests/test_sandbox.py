"""The python_tests sandbox holds even when the candidate turns its own audit hook off: the
namespaces bubblewrap builds show it nothing of the host, and the check's detail carries no
host data back. Without bubblewrap nothing runs."""

from __future__ import annotations

import pathlib
import shutil
import socket
import tempfile

import pytest

from rmesh.verifier_svc.sandbox import Limits, run_python_tests

# The escape trick that turned the audit hook off before bubblewrap fenced the child in.
UNHOOK = "import sys\nsys.modules['__main__'].BLOCKED.clear()\nsys.modules['__main__'].PATH_EVENTS.clear()\n"
SECRET = "canary-7f3a9c"


def attempt(code: str) -> tuple[bool, str]:
    """Run ``code`` as the solution with a test that reports what it found through a failed
    assertion, the way an attacker carries data back in the check's detail."""
    outcome = run_python_tests(UNHOOK + code, "assert False, repr(FOUND)", Limits(wall_seconds=10))
    return outcome.passed, outcome.reason + outcome.output


@pytest.fixture
def marker(tmp_path) -> pathlib.Path:
    path = tmp_path / "tenant-secret.txt"
    path.write_text(SECRET)
    return path


def test_a_host_file_cannot_be_read(marker):
    passed, seen = attempt(
        f"try:\n    FOUND = open({str(marker)!r}).read()\nexcept OSError as exc:\n    FOUND = type(exc).__name__\n"
    )
    assert not passed and SECRET not in seen and "FileNotFoundError" in seen


def test_the_verifiers_environment_and_other_processes_stay_hidden(monkeypatch):
    monkeypatch.setenv("RMESH_TEST_CANARY", SECRET)
    passed, seen = attempt(
        "import os\n"
        "FOUND = [dict(os.environ), open('/proc/self/environ').read(), sorted(p for p in os.listdir('/proc') if p.isdigit()),\n"
        "         os.listdir('/'), os.getuid()]\n"
    )
    assert not passed and SECRET not in seen
    assert "65534" in seen and "'etc'" not in seen and "'root'" not in seen


def test_a_shell_runs_only_inside_the_sandbox(marker):
    passed, seen = attempt(f"import os\nFOUND = os.system('cat {marker} > out.txt 2>&1; echo $? >> out.txt') or open('out.txt').read()\n")
    assert not passed and SECRET not in seen and "No such file" in seen


def test_no_network_not_even_loopback():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        passed, seen = attempt(
            "import socket\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    FOUND = 'connected'\n"
            "except OSError as exc:\n    FOUND = type(exc).__name__\n"
        )
        with pytest.raises(socket.timeout):
            listener.accept()
    assert not passed and "'connected'" not in seen


def test_writes_outside_its_directory_never_reach_the_host(tmp_path):
    target = tmp_path / "planted.txt"
    passed, seen = attempt(
        "FOUND = []\n"
        f"for path in ({str(target)!r}, '/tmp/rmesh-planted', '/dev/shm/rmesh-planted', '/usr/rmesh-planted'):\n"
        "    try:\n        open(path, 'w').write('x'); FOUND.append(path)\n"
        "    except OSError as exc:\n        FOUND.append(type(exc).__name__)\n"
    )
    assert not passed
    assert not target.exists() and not pathlib.Path("/tmp/rmesh-planted").exists()
    assert not pathlib.Path("/dev/shm/rmesh-planted").exists() and not pathlib.Path("/usr/rmesh-planted").exists()


def test_a_fork_bomb_and_a_huge_allocation_end_at_their_limits():
    bomb, seen = attempt("import os\nwhile True:\n    os.fork()\n")
    assert not bomb
    huge = run_python_tests("data = bytearray(8 << 30)", "pass", Limits(wall_seconds=10))
    assert not huge.passed and "MemoryError" in huge.output


def test_without_bubblewrap_nothing_runs(monkeypatch, tmp_path):
    """Fail closed: no bubblewrap means no check, and the reason says so."""
    monkeypatch.setenv("RMESH_SANDBOX_BWRAP", str(tmp_path / "no-bwrap"))
    ran = tmp_path / "ran"
    outcome = run_python_tests(f"open({str(ran)!r}, 'w').write('x')", "pass")
    assert not outcome.passed and outcome.reason.startswith("sandbox unavailable, check not run: bubblewrap")
    assert not ran.exists()


def test_when_bubblewrap_cannot_build_the_sandbox_nothing_runs(monkeypatch):
    """A bwrap that fails to set up (as under a seccomp profile without user namespaces)."""
    # Where the unprivileged user the sandbox starts as can run it.
    folder = pathlib.Path(tempfile.mkdtemp(prefix="rmesh-fake-bwrap-"))
    folder.chmod(0o755)
    fake = folder / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("RMESH_SANDBOX_BWRAP", str(fake))
    try:
        outcome = run_python_tests("pass", "pass")
    finally:
        shutil.rmtree(folder)
    assert not outcome.passed
    assert outcome.reason == "sandbox unavailable, check not run: bwrap: No permissions to creating new namespace"
