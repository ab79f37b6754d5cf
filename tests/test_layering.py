"""The layering rules of docs/architecture.md, read off the source: benchmarks are drivers, files stay small."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tangram"


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports (absolute names; relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    package = ".".join(("tangram", *path.relative_to(SRC).parent.parts))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def importers_of(prefix: str, outside: str) -> list[str]:
    """Source files outside the folder `outside` that import `prefix` or a module below it."""
    hits = []
    for path in SRC.rglob("*.py"):
        if path.is_relative_to(SRC / outside):
            continue
        if any(m == prefix or m.startswith(prefix + ".") for m in imported_modules(path)):
            hits.append(str(path.relative_to(SRC)))
    return sorted(hits)


def test_no_product_module_imports_the_benchmarks():
    assert importers_of("tangram.bench", "bench") == []


def test_the_simulator_and_the_workload_module_import_nothing_from_bench():
    for folder in ("sim", "workload"):
        for path in (SRC / folder).rglob("*.py"):
            assert not any(m.startswith("tangram.bench") for m in imported_modules(path)), path


def test_the_finder_sees_a_planted_import(tmp_path):
    planted = SRC / "serve" / "_planted_for_test.py"
    planted.write_text("from tangram.bench import common\n")
    try:
        assert importers_of("tangram.bench", "bench") == ["serve/_planted_for_test.py"]
    finally:
        planted.unlink()


def test_no_source_file_is_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_bench_commands_are_mounted_through_the_entry_point():
    from typer.testing import CliRunner

    from tangram.cli import app

    result = CliRunner().invoke(app, ["bench", "--help"])
    assert result.exit_code == 0 and "coldstart" in result.output and "load" in result.output


def test_only_the_backend_registry_starts_the_vllm_backend_and_only_its_shell_imports_vllm():
    # the benches' peers find vLLM's interpreter
    assert importers_of("tangram.vllm", "vllm") == ["bench/lora_vllm.py", "bench/serve_peer.py", "engine/backend.py"]
    uses_vllm = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                       if any(m == "vllm" or m.startswith("vllm.") for m in imported_modules(p)))
    # the shell's side, and bench lora's plain-vLLM peer (a program vLLM's interpreter runs)
    assert uses_vllm == ["bench/lora_vllm_peer.py", "vllm/loader.py", "vllm/lora.py", "vllm/plugin.py",
                         "vllm/shell_main.py"]
