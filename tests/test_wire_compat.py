"""Wire compatibility: ``buf breaking`` against the last released contract (a committed buf
image), and proof that it catches a breaking change."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASELINE = ROOT / "proto" / "released" / "rmesh-api-0.1.0.binpb"
BUF = pathlib.Path(sys.executable).parent / "buf"


def breaking(module: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BUF), "breaking", str(module), "--against", str(BASELINE)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_todays_protos_keep_wire_compatibility_with_the_release():
    result = breaking(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_renumbered_field_is_caught(tmp_path):
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "proto", tmp_path / "proto", ignore=shutil.ignore_patterns("released"))
    router = tmp_path / "proto" / "rmesh" / "api" / "router" / "v1" / "router.proto"
    text = router.read_text()
    assert "string problem = 1;" in text
    router.write_text(text.replace("string problem = 1;", "string problem = 21;"))
    result = breaking(tmp_path)
    assert result.returncode != 0
    assert "router.proto" in result.stdout and "problem" in result.stdout
