"""The docs stand alone in a clone: no pointer outside the repository, every named doc path and link resolves.

A clone has no `../shared` (where the design brief and benchmark protocol were
first written): the project's own copies are docs/design.md and
docs/benchmarks.md. Each check is a function over a repository root, run on
this repository and on a planted tree that must fail it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
# Case-sensitive on purpose: docs/design.md and docs/benchmarks.md are the right names.
STALE = re.compile(r"\.\./shared|\bDESIGN\.md|\bBENCHMARKS\.md")
DOC_PATH = re.compile(r"docs/[\w./-]*[\w/]")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
SCANNED_SUFFIXES = {".py", ".md", ".toml", ".txt", ".json", ".jinja", ".cfg"}


def scanned_files(root: Path) -> list[Path]:
    """README.md, Makefile, pyproject.toml, every text file under docs/ and src/ (build metadata excluded)."""
    files = [root / name for name in ("README.md", "Makefile", "pyproject.toml") if (root / name).is_file()]
    for top in ("docs", "src"):
        for p in sorted((root / top).rglob("*")):
            if p.is_file() and p.suffix in SCANNED_SUFFIXES and not any(
                    part.endswith(".egg-info") or part == "__pycache__" for part in p.parts):
                files.append(p)
    return files


def stale_references(root: Path) -> list[str]:
    """`file:line: text` of every reference to ../shared, DESIGN.md or BENCHMARKS.md."""
    hits = []
    for p in scanned_files(root):
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if STALE.search(line):
                hits.append(f"{p.relative_to(root)}:{n}: {line.strip()}")
    return hits


def missing_doc_paths(root: Path, names: tuple[str, ...] = ("README.md",)) -> list[str]:
    """Every `docs/...` path named in the given files that does not exist."""
    missing = []
    for name in names:
        text = (root / name).read_text()
        for path in sorted(set(DOC_PATH.findall(text))):
            if not (root / path.rstrip(".")).exists():
                missing.append(f"{name}: {path}")
    return missing


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    """The anchors of every heading of a Markdown file (outside code blocks)."""
    out, fenced = set(), False
    for line in md.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            out.add(slug(m.group(1)))
    return out


def broken_links(root: Path) -> list[str]:
    """Relative Markdown links in README.md and docs/*.md whose file or heading anchor does not exist."""
    broken = []
    for md in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target in MD_LINK.findall(md.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                broken.append(f"{md.relative_to(root)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{md.relative_to(root)}: {target} (no such heading)")
    return broken


# --------------------------------------------------------------------------- this repository


def test_no_reference_outside_the_repository() -> None:
    assert stale_references(ROOT) == []


def test_doc_paths_named_in_readme_exist() -> None:
    named = set(DOC_PATH.findall((ROOT / "README.md").read_text()))
    assert {"docs/design.md", "docs/benchmarks.md"} <= named
    assert missing_doc_paths(ROOT) == []


def test_doc_paths_named_in_docs_exist() -> None:
    pages = tuple(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("*.md")))
    assert missing_doc_paths(ROOT, pages) == []


def test_markdown_links_resolve() -> None:
    assert broken_links(ROOT) == []


def test_design_and_protocol_cover_what_exists() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    for folder in ("store", "pool", "kv", "engine", "templates", "worker", "scheduler", "control", "serve",
                   "cluster", "sim", "bench"):
        assert (ROOT / "src" / "tangram" / folder).is_dir(), folder
        assert f"{folder}/" in design, f"docs/design.md does not place src/tangram/{folder}/"
    protocol = (ROOT / "docs" / "benchmarks.md").read_text().split("\n## ", 2)[1]
    assert protocol.startswith("Protocol")
    for bench in ("load", "pool", "kv", "coldstart", "sim"):
        assert f"### `bench {bench}`" in protocol, bench


def test_bench_help_points_into_docs() -> None:
    from tangram.cli import app

    out = CliRunner().invoke(app, ["bench", "--help"]).output
    assert "docs/benchmarks.md" in out
    assert not STALE.search(out)
    for bench in ("load", "pool", "kv", "coldstart", "sim"):
        assert bench in out


# --------------------------------------------------------------------------- the checks can fail


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A small repository tree with one of each defect."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg.egg-info").mkdir()
    (tmp_path / "README.md").write_text("Design: `../shared/DESIGN.md`; see docs/gone.md and [x](docs/a.md#nope).\n")
    (tmp_path / "docs" / "a.md").write_text("# A page\n\nProtocol in BENCHMARKS.md. [b](b.md)\n")
    (tmp_path / "src" / "pkg" / "m.py").write_text('"""Vocabulary (DESIGN.md)."""\n')
    (tmp_path / "src" / "pkg.egg-info" / "PKG-INFO").write_text("../shared/DESIGN.md\n")  # generated: ignored
    return tmp_path


def test_planted_defects_are_found(planted: Path) -> None:
    assert [h.split(":")[0] for h in stale_references(planted)] == ["README.md", "docs/a.md", "src/pkg/m.py"]
    assert missing_doc_paths(planted) == ["README.md: docs/gone.md"]
    assert broken_links(planted) == ["README.md: docs/a.md#nope (no such heading)", "docs/a.md: b.md (no such file)"]


def test_lower_case_doc_names_are_not_stale(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("See docs/design.md and docs/benchmarks.md.\n")
    assert stale_references(tmp_path) == []


@pytest.mark.parametrize(("heading", "anchor"), [
    ("## `bench coldstart`: what runs", "bench-coldstart-what-runs"),
    ("## Partitioned-Gain Packing (policy `tangram`)", "partitioned-gain-packing-policy-tangram"),
    ("## Measured (2-core VM, no GPU)", "measured-2-core-vm-no-gpu"),
])
def test_slug_matches_github(heading: str, anchor: str) -> None:
    assert slug(heading.lstrip("# ")) == anchor
