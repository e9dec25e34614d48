"""The layout says what the code is (zero_chatgpt/*/__init__.py tell each folder's part): components in core/,
model/, data/, train/, eval/, export/, report/, serve/ never import a stage; a stage (stages/) imports no
other stage; no module imports another's private names; the import graph has no circle; and an import inside
a function says why it is lazy (`# lazy: ...`), so a circle cannot hide there."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "zero_chatgpt"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        name = ".".join(f.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = (f, ast.parse(f.read_text()))
    return out


MODULES = _modules()


def _imports(tree, top_only=False):
    """(line, imported module, names, inside a function) for every zero_chatgpt import."""
    def walk(node, in_fn):
        for ch in ast.iter_child_nodes(node):
            fn = in_fn or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(ch, ast.ImportFrom) and ch.module and ch.module.startswith("zero_chatgpt"):
                for a in ch.names:
                    sub = f"{ch.module}.{a.name}"
                    yield ch.lineno, sub if sub in MODULES else ch.module, a.name, in_fn
            elif isinstance(ch, ast.Import):
                for a in ch.names:
                    if a.name.startswith("zero_chatgpt"):
                        yield ch.lineno, a.name, "", in_fn
            yield from walk(ch, fn)
    yield from walk(tree, False)


def _is_stage(mod: str) -> bool:
    return mod.startswith("zero_chatgpt.stages.")


def test_every_folder_says_what_it_holds():
    for d in sorted(p for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        doc = ast.get_docstring(ast.parse((d / "__init__.py").read_text()))
        assert doc and len(doc) > 60, f"{d}/__init__.py: no docstring saying what the folder holds"


def test_components_never_import_stages_and_stages_not_each_other():
    bad = []
    for mod, (f, tree) in MODULES.items():
        for line, target, name, _ in _imports(tree):
            if _is_stage(target) and target != mod and mod != "zero_chatgpt.cli":
                bad.append(f"{f.relative_to(PKG.parent)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_module_imports_another_modules_private_names():
    bad = [f"{f.relative_to(PKG.parent)}:{line} imports {target}.{name}"
           for mod, (f, tree) in MODULES.items() for line, target, name, _ in _imports(tree)
           if name.startswith("_") and name != "__version__"]
    assert not bad, "\n".join(bad)


def test_import_graph_has_no_circle_and_lazy_imports_say_why():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    unexplained = []
    for mod, (f, tree) in MODULES.items():
        lines = f.read_text().splitlines()
        for line, target, _, in_fn in _imports(tree):
            if target in MODULES and target != mod and not mod.startswith(target + "."):
                graph[mod].add(target)
            if in_fn and "# lazy:" not in lines[line - 1]:
                unexplained.append(f"{f.relative_to(PKG.parent)}:{line}")
    assert not unexplained, "imports inside functions without a `# lazy:` reason:\n" + "\n".join(unexplained)
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for t in sorted(graph[m]):
            if t != "zero_chatgpt":
                visit(t)
        stack.pop()
        done.add(m)
    for m in sorted(graph):
        visit(m)
