"""Install hygiene: every third-party module the package imports is a declared runtime dependency,
the repository root shadows no installed distribution, and a run from the root imports the real
third-party packages (transformers' own `kernels` among them) and the same `inlaid_ray.kernels`.

The reference for "who owns a module name" is the installed distributions' metadata
(`importlib.metadata.packages_distributions`), not a list kept here."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = (REPO / "inlaid_ray", REPO / "kernels")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _canonical(re.split(r"[\s\[<>=!~;@]", spec.strip(), maxsplit=1)[0])


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def runtime_requirements() -> set[str]:
    return {_requirement_name(r) for r in _pyproject()["project"]["dependencies"]}


def _top_level_imports(path: Path) -> set[str]:
    """Absolute imports anywhere in the module (function-local ones included: they run too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.partition(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def third_party_imports() -> dict[str, list[str]]:
    """Top-level module name -> the package files importing it (stdlib and inlaid_ray left out)."""
    found: dict[str, list[str]] = {}
    for root in PACKAGE_ROOTS:
        for path in sorted(root.rglob("*.py")):
            for name in _top_level_imports(path):
                if name not in sys.stdlib_module_names and name != "inlaid_ray":
                    found.setdefault(name, []).append(str(path.relative_to(REPO)))
    return found


def test_every_runtime_import_is_a_declared_runtime_dependency():
    owners = md.packages_distributions()
    declared = runtime_requirements()
    missing = []
    for module, files in sorted(third_party_imports().items()):
        dists = {_canonical(d) for d in owners.get(module, [])}
        assert dists, f"no installed distribution provides {module!r} (imported by {files})"
        if not dists & declared:
            missing.append(f"{module} (from {sorted(dists)}, imported by {files[:3]})")
    assert not missing, "imported at run time but not in [project].dependencies: " + "; ".join(missing)


def test_dev_extra_holds_only_test_tools():
    """The dependency check above is what keeps this true; this pins the other direction: a
    package moved from the runtime list into `dev` would be caught by it, and `dev` adds nothing
    that the package imports."""
    dev = {_requirement_name(r) for r in _pyproject()["project"]["optional-dependencies"]["dev"]}
    owners = md.packages_distributions()
    imported = {_canonical(d) for m in third_party_imports() for d in owners.get(m, [])}
    assert not (dev & imported) - runtime_requirements()


def test_repository_root_shadows_no_installed_distribution():
    """A folder with `__init__.py` or a `.py` file at the root is importable whenever the root is on
    sys.path (pytest, `python -m`, Ray workers started there): none may carry a name that an
    installed distribution owns."""
    owners = md.packages_distributions()
    own = {"inlaid_ray"}
    importable = {p.stem for p in REPO.glob("*.py")} | {p.parent.name for p in REPO.glob("*/__init__.py")}
    clashes = {n: owners[n] for n in importable - own if n in owners}
    assert not clashes, f"repository root shadows installed distributions: {clashes}"
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/ must stay a non-package folder"


@pytest.mark.slow  # a Python process per statement, each importing transformers or torch
@pytest.mark.parametrize("statement", [
    "import transformers.activations",
    "from transformers import LlamaConfig",
    "import inlaid_ray.kernels.ops as ops; assert ops.__file__.endswith('ops.py')",
])
def test_imports_from_the_repository_root(statement):
    """As a user types it in the repository root (cwd first on sys.path)."""
    proc = subprocess.run([sys.executable, "-c", statement], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_installed_kernels_distribution_wins_over_the_kernels_folder():
    """transformers imports Hugging Face's `kernels`; from the root it must still get that one."""
    code = ("import importlib.metadata as md, importlib.util as u; spec = u.find_spec('kernels'); "
            "print(md.version('kernels') if spec and spec.origin else 'absent', spec and spec.origin, "
            "list(spec.submodule_search_locations or []) if spec else [])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    try:
        md.version("kernels")
    except md.PackageNotFoundError:  # older transformers: only our namespace portion can be found
        assert str(REPO / "kernels") not in proc.stdout, proc.stdout
        return
    version, origin = proc.stdout.split()[:2]
    assert version == md.version("kernels") and not origin.startswith(str(REPO / "kernels")), proc.stdout


def _imports_of(path: Path) -> set[str]:
    """Full dotted names of the absolute imports of a module (function-local ones included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_model_package_knows_no_checkpoint_format():
    """The serving model imports nothing from quant/ or quantized_base/: formats swap modules in
    at load time."""
    offenders = {str(p.relative_to(REPO)): sorted(n for n in _imports_of(p)
                                                   if _in_package(n, "inlaid_ray.quant")
                                                   or _in_package(n, "inlaid_ray.quantized_base"))
                 for p in (REPO / "inlaid_ray" / "model").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_serving_code_imports_no_offline_quantization():
    """Serving-time packages take from quant/ only the grid (`quant.quantizer`, the checkpoint's
    settings) and the GPTQ result type: never the MLGPTQ driver, calibration or statistics."""
    package = REPO / "inlaid_ray"
    serving = ("model", "engine", "serve", "quantized_base", "registry", "lora", "sched")
    allowed = {"inlaid_ray.quant.quantizer", "inlaid_ray.quant.gptq"}
    offenders = {str(p.relative_to(REPO)): sorted(n for n in _imports_of(p)
                                                   if _in_package(n, "inlaid_ray.quant") and n not in allowed)
                 for sub in serving for p in (package / sub).rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_only_the_cli_imports_the_demo():
    """demo/ (fixtures, adapters, manifest, driver) is imported by nothing but the CLI: serving,
    jobs and the math know no demo task."""
    package = REPO / "inlaid_ray"
    allowed = {package / "cli.py"}
    offenders = {str(p.relative_to(REPO)): sorted(n for n in _imports_of(p) if n.startswith("inlaid_ray.demo"))
                 for p in package.rglob("*.py") if p not in allowed and (package / "demo") not in p.parents}
    assert not {k: v for k, v in offenders.items() if v}


def test_every_package_is_installed():
    """A non-editable install (the demo command's) ships exactly the packages pyproject lists:
    every folder of inlaid_ray/ with an __init__.py must be there."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "inlaid_ray").rglob("__init__.py")}
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_every_module_imports():
    """Every module of the package imports in the dev environment (a stale import path fails here,
    not at run time in a rarely used command)."""
    import importlib
    import pkgutil

    import inlaid_ray

    names = [m.name for m in pkgutil.walk_packages(inlaid_ray.__path__, "inlaid_ray.")]
    assert len(names) > 100
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every failing module at once
            failed[name] = repr(exc)
    assert not failed, failed
