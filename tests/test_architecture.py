"""Every import between parts is an arrow of docs/architecture.md, with its names; DeepSpeed stays where the
doc allows it; and what the doc lists still crosses. The doc is the source of truth: when a test here fails,
its message gives the table rows to add, or the names to drop.

Imports are read with `ast` from the source (module level and inside functions), nothing is imported.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
SCANNED = ("alectra", "data_prep", "kernels")  # tests/ and benchmarks/ may import anything


def doc_table(heading: str, text: str | None = None) -> list[list[str]]:
    """Body rows of the first table under `## heading`, as stripped cells."""
    text = DOC.read_text() if text is None else text
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip() for line in section.splitlines() if line.strip().startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def doc_parts(text: str | None = None) -> dict[str, str]:
    """Module path (a file, or a folder ending in /) -> part name."""
    return {
        path: part
        for part, modules, _ in doc_table("Parts", text)
        for path in re.findall(r"`([^`]+)`", modules)
    }


def doc_arrows(text: str | None = None) -> dict[tuple[str, str], set[str]]:
    return {
        (src, dst): {n.strip() for n in names.split(",") if n.strip()}
        for src, dst, names in doc_table("Arrows", text)
    }


def part_of(path: str, parts: dict[str, str]) -> str | None:
    """The part of a repository path ("alectra/storage/atomic.py"): the longest listed prefix."""
    matches = [p for p in parts if path == p or (p.endswith("/") and path.startswith(p))]
    return parts[max(matches, key=len)] if matches else None


def module_path(module: str) -> str | None:
    """Repository path of a project module ("alectra.storage.atomic" -> "alectra/storage/atomic.py")."""
    if module.split(".")[0] not in SCANNED:
        return None
    base = module.replace(".", "/")
    return f"{base}.py" if (ROOT / f"{base}.py").is_file() else f"{base}/"


def imports(path: str, source: str) -> list[tuple[str, str, bool, int]]:
    """(module, name, inside a function, line) of every import in `source` (relative ones resolved)."""
    package = path.removesuffix(".py").replace("/", ".")
    if not path.endswith("/__init__.py"):
        package = package.rsplit(".", 1)[0]
    else:
        package = package.removesuffix(".__init__")
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((a.name, a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                module = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    module = ".".join([*anchor, module] if module else anchor)
                found.extend((module, a.name, in_function, child.lineno) for a in child.names)
            visit(child, nested)

    visit(ast.parse(source), False)
    return found


def project_sources() -> dict[str, str]:
    files = sorted(p for root in SCANNED for p in (ROOT / root).rglob("*.py") if "__pycache__" not in p.parts)
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in files}


def crossings(sources: dict[str, str], parts: dict[str, str]) -> dict[tuple[str, str], dict[str, list[str]]]:
    """(from part, to part) -> imported name -> where ("path:line")."""
    found: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path, source in sources.items():
        src = part_of(path, parts)
        for module, name, _, line in imports(path, source):
            target = module_path(module)
            dst = part_of(target, parts) if target else None
            if dst is not None and dst != src:
                found[(src, dst)][name].append(f"{path}:{line}")
    return found


def unlisted(sources: dict[str, str], doc_text: str | None = None) -> list[str]:
    """Each import between parts that the doc does not list, as the doc row that would allow it."""
    parts, arrows = doc_parts(doc_text), doc_arrows(doc_text)
    problems = []
    for (src, dst), names in sorted(crossings(sources, parts).items()):
        missing = sorted(set(names) - arrows.get((src, dst), set()))
        if missing:
            where = ", ".join(names[n][0] for n in missing)
            kind = "name(s)" if (src, dst) in arrows else "arrow"
            problems.append(f"unlisted {kind}: | {src} | {dst} | {', '.join(missing)} |  ({where})")
    return problems


def test_every_module_belongs_to_a_part():
    parts = doc_parts()
    orphans = [path for path in project_sources() if part_of(path, parts) is None]
    assert not orphans, f"modules in no part of docs/architecture.md's Parts table: {orphans}"


def test_every_import_between_parts_is_a_listed_arrow_and_name():
    problems = unlisted(project_sources())
    assert not problems, "add these rows/names to docs/architecture.md (or remove the import):\n" + "\n".join(
        problems
    )


def test_every_listed_name_still_crosses():
    used = crossings(project_sources(), doc_parts())
    stale = [
        f"| {src} | {dst} | {', '.join(sorted(names - set(used.get((src, dst), {}))))} |"
        for (src, dst), names in sorted(doc_arrows().items())
        if names - set(used.get((src, dst), {}))
    ]
    assert not stale, "docs/architecture.md lists names no module imports any more:\n" + "\n".join(stale)


def test_deepspeed_only_where_the_doc_allows_it():
    parts = doc_parts()
    rules = {row[0]: row for row in doc_table("Third-party rules")}
    _, anywhere, in_functions = rules["deepspeed"]
    anywhere_parts = {p.strip() for p in anywhere.split(",")}
    function_parts = {p.strip() for p in in_functions.split(",")}
    bad = []
    for path, source in project_sources().items():
        part = part_of(path, parts)
        for module, _, in_function, line in imports(path, source):
            if module.split(".")[0] != "deepspeed" or part in anywhere_parts:
                continue
            if not (in_function and part in function_parts):
                bad.append(f"{path}:{line} ({part}) imports {module}")
    assert not bad, bad


def test_the_checker_catches_a_forbidden_arrow_and_an_unlisted_name():
    """The checks above would notice training importing data_prep again (the cycle issue 15 removed), a
    function-level import included, and a new name on an existing arrow."""
    sources = {
        "alectra/training/build.py": "def paths():\n    from data_prep import prepare_demo\n",
        "alectra/training/data.py": "from alectra.storage.indexed import token_dtype\n",
    }
    problems = unlisted(sources)
    assert any("| training | data_prep | prepare_demo |" in p and "unlisted arrow" in p for p in problems)
    assert any("| training | storage | token_dtype |" in p and "unlisted name" in p for p in problems)
    assert imports("alectra/data/x.py", "from .rules import check_weights\n")[0][0] == "alectra.data.rules"


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "alectra.glue", "--help"],
        [sys.executable, "-m", "data_prep", "--help"],
        [sys.executable, "-m", "alectra.export", "--help"],
        [sys.executable, str(ROOT / "alectra" / "pretrain.py"), "--help"],
    ],
    ids=["glue", "data_prep", "export", "pretrain"],
)
def test_entry_points_help_without_deepspeed(command):
    """`--help` of every entry point answers without importing DeepSpeed (python -X importtime lists every
    module a process imports)."""
    done = subprocess.run([*command[:1], "-X", "importtime", *command[1:]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "deepspeed" not in imported
    assert "usage:" in done.stdout
