"""The python_tests sandbox holds even when the candidate turns its own audit hook off: the
namespaces bubblewrap builds show it nothing of the host, and the check's detail carries no
host data back. Without bubblewrap nothing runs."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from conftest import SERVICE_METADATA, SETTINGS, inner_channel, service_env
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from rmesh.api.router.v1 import router_pb2
from rmesh.api.verifier.v1 import verifier_pb2, verifier_pb2_grpc
from rmesh.client import AsyncMeshClient
from rmesh.engine.instant import InstantEngine
from rmesh.mesh.serve import start_services
from rmesh.config import ServerSettings, VerifierConfig
from rmesh.telemetry import tracer_provider
from rmesh.verifier_svc.serve import start_verifier
from rmesh.domain import Candidate, CheckSpec, TaskSpec
from rmesh.errors import InvalidRequest
from rmesh.verifier_svc.core import MAX_SANDBOX_RUNS, VerifierCore
from rmesh.verifier_svc.sandbox import Limits, run_python_tests, set_concurrency

ROOT = pathlib.Path(__file__).resolve().parent.parent
RMESH = str(pathlib.Path(sys.executable).parent / "rmesh")
RMESH_ROUTER = str(pathlib.Path(sys.executable).parent / "rmesh-router")


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


@pytest.mark.parametrize(
    "how",
    [
        "import ctypes\nlibc = ctypes.CDLL(None)\nFOUND = [libc.system(b'cat MARKER > got.txt 2>&1'), open('got.txt').read()]\n",
        "import subprocess\nFOUND = subprocess.run(['cat', 'MARKER'], capture_output=True, text=True).stderr\n",
        "import os\npid = os.posix_spawn('/usr/bin/cat', ['cat', 'MARKER'], {})\nFOUND = os.waitpid(pid, 0)\n",
        "import os\npid = os.fork()\nif pid == 0:\n    os.execv('/usr/bin/cat', ['cat', 'MARKER'])\nFOUND = os.waitpid(pid, 0)\n",
        "import os\nFOUND = [open('/proc/1/environ').read(), os.readlink('/proc/1/exe'), open('/proc/1/cmdline').read()]\n",
    ],
    ids=["ctypes", "subprocess", "posix_spawn", "fork", "proc-1"],
)
def test_native_code_and_new_processes_see_no_more_than_the_sandbox(marker, monkeypatch, how):
    monkeypatch.setenv("RMESH_TEST_CANARY", SECRET)
    passed, seen = attempt("FOUND = None\n" + how.replace("MARKER", str(marker)))
    assert not passed and SECRET not in seen
    assert "RMESH_TEST_CANARY" not in seen and "PYTEST_CURRENT_TEST" not in seen  # nor the verifier's environment


def test_a_unix_socket_of_a_local_service_is_out_of_reach(tmp_path):
    path = tmp_path / "service.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        path.chmod(0o777)
        listener.listen(1)
        listener.settimeout(0.5)
        passed, seen = attempt(
            "import socket\ns = socket.socket(socket.AF_UNIX)\n"
            f"try:\n    s.connect({str(path)!r})\n    FOUND = 'connected'\nexcept OSError as exc:\n    FOUND = type(exc).__name__\n"
        )
        with pytest.raises(socket.timeout):
            listener.accept()
    assert not passed and "'connected'" not in seen


# -- bounded: the caller's deadline and the concurrency limit ---------------------------------------


def test_a_run_is_killed_at_the_callers_deadline():
    started = time.monotonic()
    outcome = run_python_tests("import time\ntime.sleep(30)", "pass", Limits(wall_seconds=5), deadline=time.monotonic() + 1.0)
    took = time.monotonic() - started
    assert not outcome.passed and outcome.reason == "killed at the caller's deadline"
    assert took < 2.5
    late = run_python_tests("pass", "pass", deadline=time.monotonic() - 1)
    assert late.reason == "not run: the caller's deadline has passed"


def test_runs_past_the_concurrency_limit_wait_only_until_their_deadline():
    set_concurrency(1)
    try:
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(run_python_tests, "import time\ntime.sleep(2)", "pass", Limits(wall_seconds=5))
            time.sleep(0.3)
            queued = pool.submit(run_python_tests, "pass", "pass", Limits(), time.monotonic() + 0.8)
            assert queued.result().reason == "not run: every sandbox slot stayed busy until the caller's deadline"
            assert slow.result().passed
        assert run_python_tests("pass", "pass").passed  # the slot is free again
    finally:
        set_concurrency(2)


def test_one_verify_call_is_bounded_in_sandboxed_runs():
    core = VerifierCore()
    task = TaskSpec(checks=(CheckSpec("python_tests", {"tests": "pass"}),))
    candidates = [Candidate(id=str(i), final_answer="x = 1") for i in range(MAX_SANDBOX_RUNS + 1)]
    with pytest.raises(InvalidRequest) as info:
        core.verify(task, {}, (), candidates)
    assert info.value.field == "candidates" and f"at most {MAX_SANDBOX_RUNS} per call" in info.value.reason


# -- opt-in and fail closed, in policy lint and on a running verifier ------------------------------


def _opted_in(tmp_path: pathlib.Path) -> pathlib.Path:
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    text = (ROOT / "policy" / "tenants" / "demo.yaml").read_text() + "allow_python_tests: true\n"
    (tenants / "demo.yaml").write_text(text)
    return tenants


def test_lint_fails_a_tenant_allowing_python_tests_where_the_sandbox_cannot_run(tmp_path):
    tenants = _opted_in(tmp_path)
    line = (tenants / "demo.yaml").read_text().splitlines().index("allow_python_tests: true") + 1
    env = {**os.environ, "RMESH_SANDBOX_BWRAP": str(tmp_path / "no-bwrap")}
    broken = subprocess.run([RMESH, "policy", "lint", str(tenants)], capture_output=True, text=True, env=env, timeout=60)
    assert broken.returncode == 1
    assert f"FAIL {tenants / 'demo.yaml'}:{line}: allow_python_tests: the python_tests sandbox is unavailable" in broken.stdout
    working = subprocess.run([RMESH, "policy", "lint", str(tenants)], capture_output=True, text=True, timeout=60)
    assert working.returncode == 0 and "python_tests sandbox available" in working.stdout


async def test_a_verifier_reports_its_sandbox_and_can_leave_python_tests_out(tmp_path):
    tenants = _opted_in(tmp_path)
    for setting, listed, status in (("on", True, "SERVING"), ("off", False, None)):
        service = await start_verifier(
            "127.0.0.1:0", SETTINGS, tracer_provider("v", {}), config=VerifierConfig(python_tests=setting)
        )
        address = f"127.0.0.1:{service.port}"
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                names = (await verifier_pb2_grpc.VerifierServiceStub(channel).ListCheckers(
                    verifier_pb2.ListCheckersRequest(), metadata=SERVICE_METADATA, timeout=5)).names
                assert ("python_tests" in names) is listed
            lint = await asyncio.to_thread(
                subprocess.run, [RMESH_ROUTER, "policy", "lint", str(tenants), "--verifier", address],
                capture_output=True, text=True, timeout=60,
            )
            if status == "SERVING":
                assert lint.returncode == 0 and "python_tests sandbox available" in lint.stdout
            else:
                assert lint.returncode == 1 and "does not offer python_tests (RMESH_PYTHON_TESTS=off)" in lint.stdout
        finally:
            await service.stop(0)


async def test_a_separate_code_verifier_gets_the_tasks_with_code_checks(tmp_path):
    """The chart's codeVerifier layout: the general verifier offers no python_tests at all; the
    router and the solver send tasks with a code check to the code verifier."""
    tenants = _opted_in(tmp_path)
    (code,) = await start_services(("verifier",), service_env(tmp_path))
    rest = await start_services(
        ("verifier", "solver", "router"),
        service_env(
            tmp_path, RMESH_TENANTS_DIR=str(tenants), RMESH_PYTHON_TESTS="off", RMESH_CODE_VERIFIER_ADDR=f"127.0.0.1:{code.port}"
        ),
        engine=InstantEngine(),
    )
    try:
        assert "python_tests" not in rest[0].core.checker_names
        router = f"127.0.0.1:{rest[-1].port}"
        async with AsyncMeshClient(router, api_key="demo-key", timeout=60) as client:
            tested = await client.outcome("Return five.", checks=[{"name": "python_tests", "params": {"tests": "assert True"}}])
            failing = await client.outcome("Return five.", checks=[{"name": "python_tests", "params": {"tests": "assert False, 'no'"}}])
            plain = await client.outcome("What is 2 + 3?", checks=[{"name": "arithmetic", "params": {"expression": "2 + 3"}}])
        assert tested.released and tested.assurance == router_pb2.ASSURANCE_EXACT_CHECKS
        assert not failing.released and "python_tests" in failing.reason
        assert plain.released and plain.answer == "5"
    finally:
        for service in reversed(rest):
            await service.stop(0)
        await code.stop(0)


ATTACKS = {
    "host file": "FOUND = open(MARKER).read()",
    "environment": "import os\nFOUND = [dict(os.environ), open('/proc/self/environ').read()]",
    "process 1": "FOUND = [open('/proc/1/environ').read(), open('/proc/1/cmdline').read()]",
    "ctypes": "import ctypes\nctypes.CDLL(None).system(('cat ' + MARKER + ' > got 2>&1').encode())\nFOUND = open('got').read()",
    "subprocess": "import subprocess\nFOUND = subprocess.run(['cat', MARKER], capture_output=True, text=True)",
    "fork bomb": "import os\nwhile True:\n    os.fork()",
    "huge allocation": "FOUND = bytearray(8 << 30)",
}


async def test_attacks_through_a_running_verifier_fail_and_reveal_nothing(tmp_path, marker, monkeypatch, caplog):
    """Each attack as a candidate of one Verify call on a real verifier: every check fails, the
    verifier keeps serving, and the secrets appear in no response, span or log line."""
    monkeypatch.setenv("RMESH_TEST_CANARY", SECRET)
    spans = InMemorySpanExporter()
    (service,) = await start_services(("verifier",), service_env(tmp_path), extra_processors=[SimpleSpanProcessor(spans)])
    address = f"127.0.0.1:{service.port}"
    try:
        request = verifier_pb2.VerifyRequest()
        request.task.checks.add(name="python_tests").params.update({"tests": "assert False, repr(FOUND)"})
        for name, code in ATTACKS.items():
            prefix = UNHOOK + f"MARKER = {str(marker)!r}\nFOUND = None\n"
            request.candidates.add(id=name, final_answer=prefix + "try:\n" + "".join(f"    {line}\n" for line in code.splitlines())
                                   + "except BaseException as exc:\n    FOUND = repr(exc)\n")
        async with inner_channel(address) as channel:
            stub = verifier_pb2_grpc.VerifierServiceStub(channel)
            reply = await stub.Verify(request, timeout=120)
            assert [v.checks[-1].passed for v in reply.verdicts] == [False] * len(ATTACKS)
            assert SECRET.encode() not in reply.SerializeToString()
            benign = verifier_pb2.VerifyRequest()
            benign.task.checks.add(name="python_tests").params.update({"tests": "assert f() == 2"})
            benign.candidates.add(id="ok", final_answer="def f():\n    return 2\n")
            assert (await stub.Verify(benign, timeout=30)).verdicts[0].checks[0].passed
        async with grpc.aio.insecure_channel(address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        exported = "".join(str(dict(span.attributes or {})) + str([e.attributes for e in span.events]) for span in spans.get_finished_spans())
        assert spans.get_finished_spans() and SECRET not in exported
        assert SECRET not in caplog.text
    finally:
        await service.stop(0)


# The hook off by another road than BLOCKED.clear(): its code swapped through the garbage collector.
UNHOOK_BY_GC = (
    "import gc\n"
    "for f in gc.get_objects():\n"
    "    if getattr(f, '__name__', '') == 'hook' and hasattr(f, '__code__'):\n"
    "        f.__code__ = (lambda e, a: None).__code__\n"
)


@pytest.mark.parametrize("swap", ["symlink", "fifo", "directory"])
def test_files_the_child_leaves_behind_never_reach_the_host(monkeypatch, swap):
    """The child replaces whatever could carry its output with a link to the verifier's own
    environment, a FIFO or a directory: output travels through the parent's descriptor, so
    nothing of the host comes back and the run ends promptly."""
    monkeypatch.setenv("RMESH_TEST_CANARY", SECRET)
    plant = {
        "symlink": "os.symlink('/proc/self/environ', name); os.symlink('/proc/1/environ', 'x' + name)",
        "fifo": "os.mkfifo(name)",
        "directory": "os.mkdir(name)",
    }[swap]
    tests = UNHOOK_BY_GC + "import os\nfor name in ('output.txt', 'out', 'stdout'):\n    " + plant + "\nraise SystemExit(3)\n"
    started = time.monotonic()
    outcome = run_python_tests("x = 1", tests, Limits(wall_seconds=10))
    assert time.monotonic() - started < 8
    assert not outcome.passed and SECRET not in outcome.reason + outcome.output


def test_the_sandboxs_own_directory_and_tmp_are_small():
    passed, seen = attempt(
        "FOUND = []\n"
        "for path in ('big', '/tmp/big'):\n"
        "    try:\n"
        "        with open(path, 'wb') as f:\n"
        "            for _ in range(64):\n"
        "                f.write(b'x' * (1 << 20))\n"
        "        FOUND.append('wrote 64 MiB')\n"
        "    except OSError as exc:\n"
        "        FOUND.append(exc.errno)\n"
    )
    assert not passed and "wrote 64 MiB" not in seen
    # RLIMIT_FSIZE (EFBIG, 27) or the tmpfs size (ENOSPC, 28) stops each file; many files stop at the size.
    many, seen = attempt(
        "FOUND = 0\n"
        "try:\n"
        "    for i in range(64):\n"
        "        open(f'f{i}', 'wb').write(b'x' * ((1 << 20) - 1))\n"
        "        FOUND += 1\n"
        "except OSError as exc:\n"
        "    FOUND = (FOUND, exc.errno)\n"
    )
    assert not many and "28)" in seen  # ENOSPC after about 16 files of 1 MiB
