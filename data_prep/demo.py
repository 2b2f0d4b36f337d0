"""The built-in demo corpus: English prose that ships with every Python interpreter.

It is the text of ``pydoc_data.topics`` (the language reference topics ``help()`` shows) followed by the
docstrings of the standard library's modules, classes and functions, read from the source files with
``ast`` (nothing is imported, so no module's import-time side effects run). The order is fixed (sorted
paths), so the corpus is the same on every machine with the same Python version.
"""

from __future__ import annotations

import ast
import inspect
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Folders of the standard library whose docstrings are tests, generated tables or vendored code.
_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
    "ensurepip",
}
_MIN_WORDS = 12  # one-line docstrings ("Return x.") carry no sentence structure worth training on


def _docstrings(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc.split()) >= _MIN_WORDS:
                yield doc


def demo_documents() -> Iterator[str]:
    """Yield the demo corpus one document at a time (pydoc topics, then stdlib docstrings)."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield inspect.cleandoc(topics[key])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # a few stdlib files are templates or Python-2 fixtures; skip them
        yield from _docstrings(tree)
