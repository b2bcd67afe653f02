"""The contracts: the generated package matches proto/, and buf lint (STANDARD) is clean."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gen_proto  # noqa: E402


def test_generated_package_is_fresh(tmp_path):
    """Regenerating from proto/ must give byte-identical files; run `make proto` when this fails."""
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in gen_proto.generate(tmp_path)}
    checked_in_root = ROOT / "shared" / "src"
    checked_in = {
        p.relative_to(checked_in_root): p.read_bytes()
        for p in (checked_in_root / "rmesh" / "api").rglob("*")
        if p.is_file() and p.suffix in {".py", ".pyi"}
    }
    stale = sorted(str(k) for k in set(fresh) | set(checked_in) if fresh.get(k) != checked_in.get(k))
    assert not stale, f"stale generated files (run `make proto`): {stale}"


def test_buf_lint_standard_is_clean():
    buf = pathlib.Path(sys.executable).parent / "buf"
    result = subprocess.run([str(buf), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STANDARD" in (ROOT / "buf.yaml").read_text()
