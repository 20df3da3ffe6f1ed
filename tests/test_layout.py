"""The architecture as a test: imports between modules form no circle, and run one way between packages.

Every ``import`` and ``from … import`` of ``pipeline`` or ``stages`` is read from the source with
``ast``, the ones inside functions included (a lazy import is still a dependency). Running it as a
script prints the graph's circles and the imports that break a rule:

    python tests/test_layout.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("pipeline", "stages")

# What each part of pipeline/ may import from pipeline/ (besides itself). "base" is the top level:
# models, configs, checks, errors, atomic files and pre-emption, which everything can reach.
MAY_IMPORT = {
    "base": {"base"},
    "store": {"base"},
    "text": {"base"},
    "teacher": {"base"},
    "decode": {"base", "teacher"},
    "evaluate": {"base", "text"},
    "train": {"base", "store", "teacher", "text"},
}


# How the student is spread over processes lives in one module: the process group, DDP/FSDP wrapping
# and sharded (DCP) checkpoints. Others may run collectives (all_reduce, barrier) but not these.
SPREAD = "pipeline.train.distributed"
SPREAD_IMPORTS = ("torch.distributed.fsdp", "torch.distributed.checkpoint", "torch.nn.parallel")
SPREAD_NAMES = ("init_process_group", "DistributedDataParallel", "fully_shard", "FullyShardedDataParallel")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name → source file, for every module of the import packages."""
    found = {}
    for top in TOP:
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules that module ``name`` (at ``path``) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pipeline import store` imports the module pipeline.store; `from pipeline.x import f` imports x
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import pipeline.a.b` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name and target.split(".")[0] in TOP:
                out.add(target)
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    found = modules(root)
    # a package's __init__ holds only its docstring; an import of the package is not an edge worth a circle
    return {name: imports(path, name, set(found)) for name, path in found.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return out


def part(module: str) -> str:
    """stages, or the part of pipeline/ a module belongs to ("base" for the top level)."""
    parts = module.split(".")
    if parts[0] == "stages":
        return "stages"
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in MAY_IMPORT) else "base"


def broken_rules(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in sorted(edges.items()):
        source = part(module)
        if source == "stages":
            continue
        for target in sorted(targets):
            wanted = part(target)
            if wanted == "stages":
                out.append(f"{module} imports {target}: pipeline/ never imports stages/")
            elif wanted != source and wanted not in MAY_IMPORT.get(source, set()):
                out.append(f"{module} ({source}) imports {target} ({wanted}); {source} may import only "
                           f"{', '.join(sorted(MAY_IMPORT.get(source, ())))}")
    return out


def spread_outside(root: Path = ROOT) -> list[str]:
    """Where a module other than :data:`SPREAD` starts a process group, wraps a model for DDP/FSDP or
    imports torch's FSDP, DCP or DDP (``module: what``)."""
    out = []
    for name, path in modules(root).items():
        if name == SPREAD:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names if a.name.startswith(SPREAD_IMPORTS)]
            elif isinstance(node, ast.ImportFrom):
                found = [node.module] if (node.module or "").startswith(SPREAD_IMPORTS) else []
                found += [a.name for a in node.names if a.name in SPREAD_NAMES]
            elif isinstance(node, ast.Attribute) and node.attr in SPREAD_NAMES:
                found = [node.attr]
            elif isinstance(node, ast.Name) and node.id in SPREAD_NAMES:
                found = [node.id]
            else:
                continue
            out += [f"{name}: {what} (belongs in {SPREAD})" for what in found]
    return sorted(set(out))


def test_no_import_circle():
    assert circles(graph()) == []


def test_imports_run_one_way_between_packages():
    assert broken_rules(graph()) == []


def test_every_package_of_pipeline_is_known_and_says_what_it_owns():
    for package in sorted(p.parent for p in (ROOT / "pipeline").glob("*/__init__.py")):
        assert package.name in MAY_IMPORT, f"{package} is not in MAY_IMPORT: say what it may import"
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc and "import" in doc, f"{package}/__init__.py: a docstring saying what it owns and may import"


def test_the_student_is_spread_over_processes_in_one_module():
    assert spread_outside() == []


def test_the_spread_check_finds_wrapping_elsewhere(tmp_path):
    (tmp_path / "pipeline" / "train").mkdir(parents=True)
    (tmp_path / "stages").mkdir()
    (tmp_path / "pipeline" / "train" / "distributed.py").write_text("from torch.distributed.fsdp import fully_shard\n")
    (tmp_path / "stages" / "student.py").write_text(
        "import torch.distributed as dist\nfrom torch.distributed.checkpoint import save\n"
        "def f(m):\n    dist.all_reduce(m)\n    return torch.nn.parallel.DistributedDataParallel(m)\n")
    assert spread_outside(tmp_path) == [
        "stages.student: DistributedDataParallel (belongs in pipeline.train.distributed)",
        "stages.student: torch.distributed.checkpoint (belongs in pipeline.train.distributed)"]


def test_the_check_finds_a_circle_and_a_stage_import(tmp_path):
    """The check itself can fail: a tree with a lazy circle and a pipeline → stages import."""
    (tmp_path / "pipeline" / "teacher").mkdir(parents=True)
    (tmp_path / "stages").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "teacher" / "__init__.py").write_text('"""Teacher. May import base."""')
    (tmp_path / "pipeline" / "teacher" / "native.py").write_text("def f():\n    from pipeline.teacher.topk import g\n")
    (tmp_path / "pipeline" / "teacher" / "topk.py").write_text("from pipeline.teacher import native\n")
    (tmp_path / "pipeline" / "io.py").write_text("from stages.cli import main\n")
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "cli.py").write_text("from pipeline import io\n")
    edges = graph(tmp_path)
    assert circles(edges) == [["pipeline.io", "stages.cli"], ["pipeline.teacher.native", "pipeline.teacher.topk"]]
    assert broken_rules(edges) == ["pipeline.io imports stages.cli: pipeline/ never imports stages/"]


if __name__ == "__main__":
    edges = graph()
    found = circles(edges)
    broken = broken_rules(edges) + spread_outside()
    for component in found:
        print("circle:", " ↔ ".join(component))
    for line in broken:
        print("rule:", line)
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports: "
          f"{len(found)} circles, {len(broken)} broken rules")
    sys.exit(1 if found or broken else 0)
