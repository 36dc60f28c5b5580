"""The package's layers (docs/architecture.md, "Layers"): a module imports only its own layer and those below
it. Read from the source (every `from dusss... import`), so a new upward import fails here."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dusss"
LAYERS = {"data": 2, "losses": 2, "models": 2, "text": 2, "methods": 3, "engine": 4, "report": 5, "demo": 5,
          "testing": 5, "cli": 6, "__main__": 6}  # anything else at the package root: the foundation, 1


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 1) if len(parts) > 1 else 1


def _upward_imports(root: Path = SRC) -> set[tuple[str, str]]:
    found = set()
    for path in sorted(root.rglob("*.py")):
        module = "dusss." + ".".join(path.relative_to(root).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dusss")):
                continue
            targets = [f"dusss.{a.name}" for a in node.names] if node.module == "dusss" else [node.module]
            found |= {(module, t) for t in targets if _layer(t) > _layer(module)}
    return found


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = _upward_imports() - {("dusss.testing", "dusss.cli")}  # the forked CLI runner of the tests
    assert upward == set()


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "net.py").write_text("from dusss.engine.train import run_train\nfrom dusss import config\n")
    (tmp_path / "figures.py").write_text("from dusss import report\n")
    assert _upward_imports(tmp_path) == {("dusss.models.net", "dusss.engine.train"), ("dusss.figures", "dusss.report")}
    assert _layer("dusss.checkpoint") == 1 < _layer("dusss.models.unet") < _layer("dusss.engine.train")
