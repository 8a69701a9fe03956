"""The layers of docs/architecture.md, held true by parsing every import of the package."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "wsss_dist"
BASE = {"errors", "registry", "config", "runs", "metrics", "compat", "locks", "fingerprints"}
PEERS = {"data", "models", "methods", "viz"}  # may import the base and each other (no cycles)
LAYER = {**{m: 0 for m in BASE}, **{m: 1 for m in PEERS}, "engine": 2, "stages": 3, "pipeline": 4,
         "launcher": 5, "cli": 6, "__main__": 6, "__init__": 0}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Package modules imported anywhere in the file (module level or inside functions), resolved to full names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("wsss_dist")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("wsss_dist"):
                continue
            for a in node.names:  # `from .. import runs` imports the module wsss_dist.runs
                sub = f"{mod}.{a.name}"
                out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                        or (PKG.parent / sub.replace(".", "/")).is_dir() else mod)
    return out - {name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PKG.rglob("*.py")}


def top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    assert {top(m) for m in graph()} <= set(LAYER), {top(m) for m in graph()} - set(LAYER)


def test_stages_never_import_stages():
    bad = [(m, i) for m, deps in graph().items() if top(m) == "stages"
           for i in deps if top(i) == "stages" and i != "wsss_dist.stages"]
    assert not bad, bad


def test_imports_only_go_down():
    """A module imports only modules of its own layer or lower ones (cycles: test_no_import_cycles)."""
    bad = []
    for m, deps in graph().items():
        for i in deps:
            a, b = LAYER[top(m)], LAYER[top(i)]
            if top(m) == "__init__" or top(i) == "__init__":
                continue
            if b > a:
                bad.append(f"{m} -> {i}")
    assert not bad, "\n".join(bad)


def test_data_models_methods_never_import_stages_engine_or_launcher():
    bad = [(m, i) for m, deps in graph().items() if top(m) in PEERS
           for i in deps if top(i) in ("stages", "engine", "launcher", "cli", "pipeline")]
    assert not bad, bad


def test_no_import_cycles():
    g = graph()
    seen, stack, cycles = set(), [], []

    def visit(m: str) -> None:
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if not d.endswith("__init__") and d in g and g[d] is not None and d != "wsss_dist":
                visit(d)
        stack.pop()

    for m in sorted(g):
        visit(m)
    real = [c for c in cycles if not any(x in ("wsss_dist.models", "wsss_dist.engine", "wsss_dist.stages",
                                               "wsss_dist.data", "wsss_dist.methods") for x in c)]
    assert not real, real


def test_the_parser_sees_a_stage_importing_a_stage(tmp_path):
    """The checks above cannot pass vacuously: the parser resolves relative imports between stage files."""
    src = PKG / "stages" / "cam.py"
    assert "wsss_dist.models.build" in imports(src) and "wsss_dist.engine" in imports(src)
    fake = PKG / "stages" / "_probe_for_test.py"
    try:
        fake.write_text("from .cls import make_loss\nfrom .. import runs\n")
        assert imports(fake) == {"wsss_dist.stages.cls", "wsss_dist.runs"}
    finally:
        fake.unlink()
