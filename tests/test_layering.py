"""The package's layering: no torch under the HTTP layer, no import cycles between modules.

The HTTP layer (``service.api``) validates requests against plain catalogues of models and
methods (:mod:`service.models.catalog`, :mod:`service.methods`) and hands work to the engine; it
must never pull in torch, directly or through the method registry, so it stays cheap to import
and cannot touch a model by accident.

Imports are read from the source (every ``import``, function-local and ``TYPE_CHECKING`` ones
included, since a function-local import only hides a cycle), and neither two modules nor two
subpackages of ``service`` may import each other, directly or round a longer loop.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICE = ROOT / "service"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def api_modules() -> list[str]:
    return sorted(module_name(path) for path in (SERVICE / "api").rglob("*.py"))


_BLOCK_TORCH = """
import importlib, importlib.abc, sys, traceback

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch imported")
        return None

sys.meta_path.insert(0, NoTorch())
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if str(exc) != "torch imported":
            raise
        chain = [frame.filename for frame in traceback.extract_tb(exc.__traceback__)]
        path = [f.split("/service/", 1)[1] for f in chain if "/service/" in f]
        print(name, "<-", " <- ".join(reversed(path)))
"""


def torch_importers(modules: list[str]) -> list[str]:
    """The modules among ``modules`` whose import, in a fresh interpreter where importing torch
    fails, reaches torch; each with the files that led there, the one importing torch first."""
    done = subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH, *modules],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    return done.stdout.splitlines()


def test_every_module_of_the_http_layer_imports_without_torch() -> None:
    modules = api_modules()
    assert "service.api.routes.inference" in modules and "service.api.options" in modules
    assert torch_importers(modules) == []


def test_the_check_sees_torch_when_a_module_imports_it() -> None:
    # The check itself: a module that imports torch is reported.
    assert torch_importers(["service.config", "service.cams"]) == [
        "service.cams <- cams/gradient.py <- cams/__init__.py"
    ]




def service_sources() -> dict[str, str]:
    return {module_name(path): path.read_text(encoding="utf-8") for path in SERVICE.rglob("*.py")}


def import_graph(sources: Mapping[str, str]) -> dict[str, set[str]]:
    """Which of the given modules each one imports, wherever in the file the import is.

    ``from package import name`` is an edge to the submodule ``package.name`` when there is
    one (Python imports it), else to the package itself.
    """
    graph: dict[str, set[str]] = {name: set() for name in sources}
    for name, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                targets: Iterable[str] = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [
                    f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in sources
                    else node.module
                    for alias in node.names
                ]
            else:
                assert not isinstance(node, ast.ImportFrom), f"{name}: relative import"
                continue
            graph[name].update(t for t in targets if t in sources and t != name)
    return graph


def cycles(graph: Mapping[str, set[str]]) -> set[frozenset[str]]:
    """The nodes of every loop: the strongly connected components with more than one node."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[frozenset[str]] = set()

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        for target in graph[node]:
            if target not in order:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], order[target])
        if low[node] == order[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for node in graph:
        if node not in order:
            visit(node)
    return found


def subpackage(module: str) -> str:
    """``service.cams.base`` -> ``service.cams``; a top-level module stands for itself."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: Mapping[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(subpackage(module), set()).update(subpackage(t) for t in targets)
    return {package: targets - {package} for package, targets in packages.items()}


def test_no_two_modules_of_the_service_import_each_other() -> None:
    graph = import_graph(service_sources())
    assert len(graph) > 50 and "service.cams.extractor" in graph["service.engine.worker"]
    assert cycles(graph) == set()


def test_no_two_subpackages_of_the_service_import_each_other() -> None:
    packages = package_graph(import_graph(service_sources()))
    assert {"service.api", "service.cams", "service.engine", "service.models"} <= set(packages)
    assert cycles(packages) == set()


def test_a_cycle_through_a_function_local_import_is_found() -> None:
    sources = {
        "pkg": "",
        "pkg.a": "from pkg.b import helper\n",
        "pkg.b": "def helper():\n    from pkg import a\n    return a\n",
        "pkg.c": "import pkg.a\n",
    }
    graph = import_graph(sources)
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == {frozenset({"pkg.a", "pkg.b"})}


def _reaches(path: Path, attributes: set[str], owners: set[str], root: Path = SERVICE) -> list[str]:
    """Where ``path`` reads one of ``attributes`` from a name (or attribute) in ``owners``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Attribute) or node.attr not in attributes:
            continue
        value = node.value
        name = value.id if isinstance(value, ast.Name) else getattr(value, "attr", None)
        if name in owners:
            found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_methods_run_the_model_only_through_their_probe() -> None:
    """A method reads activations and gradients from its context and asks the probe (the
    model's runner) for anything more; none reaches past it to the model or its modules."""
    reaching = []
    for path in sorted((SERVICE / "cams").glob("*.py")):
        if path.name in ("probe.py", "extractor.py"):  # the runner's view, and who builds it
            continue
        reaching += _reaches(path, {"model", "modules", "module", "network", "_network"},
                             {"probe", "runner"})
    assert reaching == []


def test_outside_the_models_package_a_model_runs_only_through_its_owners_runner(
    tmp_path: Path,
) -> None:
    """The worker, the introspection routes' engine side, the benchmark and the evaluation
    never read the owner's networks themselves (``loaded.module``, ``.modules``, ``.lean``)."""
    attributes, owners = {"module", "modules", "lean"}, {"loaded", "owner"}
    reaching = []
    for path in sorted(SERVICE.rglob("*.py")):
        if path.parent.name != "models":
            reaching += _reaches(path, attributes, owners)
    assert reaching == []
    # The check itself sees such a read.
    sample = tmp_path / "sample.py"
    sample.write_text("def f(self, loaded):\n    return loaded.module, self.loaded.lean\n")
    assert _reaches(sample, attributes, owners, tmp_path) == ["sample.py:2", "sample.py:2"]


def test_one_copy_of_each_model_capability() -> None:
    """The Score-CAM twin and the module-level tail cache are gone: the owner keeps its lean
    copy and its tails, and no module of the service keeps models in a weak map of its own."""
    assert not (SERVICE / "cams" / "twin.py").exists() and not (SERVICE / "cams" / "tail.py").exists()
    weak = [name for name, source in service_sources().items() if "WeakKeyDictionary" in source]
    assert weak == []


def test_only_the_methods_and_their_catalogue_read_what_a_method_needs() -> None:
    """The worker, the engine and the HTTP layer read a method's needs from its declaration as
    plain data (:class:`service.methods.MethodInfo`: ``exact_network``, ``needs_*``,
    ``uses_gradients``), never by re-deriving them from the method class's own flags."""
    flags = {"own_autograd", "layer_free"}
    reading = []
    for path in sorted(SERVICE.rglob("*.py")):
        if path.parent.name == "cams":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in flags:
                reading.append(f"{path.relative_to(SERVICE)}:{node.lineno}")
    assert reading == []
