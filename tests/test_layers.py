"""The package rules, read from the source: ``merging`` and ``evals`` never import each other,
nothing imports ``service``, ``search`` does not import torch (its GP samplers may, lazily,
inside the calls that need it, as Optuna's own GPSampler does); and the light commands start
without torch or lm-eval."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "search", "merging", "evals")
FORBIDDEN = {
    "merging": {"evals", "search", "service"},
    "evals": {"merging", "search", "service"},
    "search": {"service"},
}
FORBIDDEN_AT_MODULE_LEVEL = {"search": {"torch"}}


def _imports(path: Path, module_level_only: bool = False) -> set[str]:
    """Top-level package names ``path`` imports, anywhere or only in its module body."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if module_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_what_its_layer_allows(package):
    lazy_ok = FORBIDDEN_AT_MODULE_LEVEL.get(package, set())
    broken = {str(f.relative_to(ROOT)): sorted((_imports(f) & FORBIDDEN[package])
                                               | (_imports(f, module_level_only=True) & lazy_ok))
              for f in sorted((ROOT / package).rglob("*.py"))}
    assert {f: names for f, names in broken.items() if names} == {}


def test_the_rules_see_real_imports():
    """The parser finds imports where they are, so the rule above can fail."""
    assert "torch" in _imports(ROOT / "merging" / "resident.py", module_level_only=True)
    assert "search" in _imports(ROOT / "service" / "studies.py")
    assert "evals" in _imports(ROOT / "service" / "materialize.py")  # inside a function
    assert "evals" not in _imports(ROOT / "service" / "materialize.py", module_level_only=True)


def _modules_after(args: list[str], tmp_path: Path) -> dict:
    """Run ``mmmo ARGS`` in a fresh interpreter; which heavy libraries it imported, and its exit."""
    code = (
        "import json, sys\n"
        "from service.cli import main\n"
        "try:\n"
        f"    rc = main({args!r})\n"
        "except SystemExit as exc:\n"
        "    rc = exc.code\n"
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'lm_eval': 'lm_eval' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MMMO_HOME": str(tmp_path / "home")})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_validate_and_admin_import_neither_torch_nor_lm_eval(tmp_path, tiny_zoo):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": "s", "base": str(tiny_zoo.base), "method": "ties",
                                "experts": [{"name": "add", "path": str(tiny_zoo.experts["add"])}],
                                "objectives": [{"task": "mmmo_add"}]}))
    db = f"sqlite:///{tmp_path / 'admin.db'}"
    for args in (["--help"], ["study", "validate", str(spec)], ["admin", "create-team", "t", "--db", db],
                 ["admin", "list-teams", "--db", db]):
        seen = _modules_after(args, tmp_path)
        assert seen == {"rc": 0, "torch": False, "lm_eval": False}, args


def test_merge_imports_no_lm_eval(tmp_path, tiny_zoo):
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {tiny_zoo.base}\nmodels:\n"
                      f"  - model: {tiny_zoo.experts['add']}\n    parameters: {{weight: 0.5}}\n")
    seen = _modules_after(["merge", str(config), str(tmp_path / "out")], tmp_path)
    assert seen == {"rc": 0, "torch": True, "lm_eval": False}
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_the_api_server_imports_neither_torch_nor_lm_eval_until_a_spec_is_checked():
    code = "import sys, service.app; print('torch' in sys.modules, 'lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.stdout.split() == ["False", "False"], out.stderr
