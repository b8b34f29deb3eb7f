"""docs/design.md's map of the root scripts: its layer table is what the imports make it."""
import ast
import os
import re

from conftest import ROOT


def imports_of_each_script():
    """{script: the root scripts it imports, at the top or inside a function}."""
    scripts = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    deps = {}
    for name in scripts:
        tree = ast.parse(open(os.path.join(ROOT, name + ".py"), encoding="utf-8").read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
        deps[name] = (found & scripts) - {name}
    return deps


def derived_layers(deps):
    """{script: 1 + the highest layer of what it imports} (1: imports no script); a cycle is an error."""
    layers = {}

    def layer(name, path=()):
        assert name not in path, f"import cycle: {' -> '.join(path + (name,))}"
        if name not in layers:
            layers[name] = 1 + max((layer(d, path + (name,)) for d in deps[name]), default=0)
        return layers[name]
    for name in deps:
        layer(name)
    return layers


def documented_layers():
    """{script: layer} from the table under "Who imports whom" in docs/design.md."""
    text = open(os.path.join(ROOT, "docs", "design.md"), encoding="utf-8").read()
    section = text.split("## Who imports whom")[1].split("\n## ")[0]
    table = {}
    for number, files in re.findall(r"^\| (\d+) \| ([^|]+) \|", section, re.M):
        for name in re.findall(r"`(\w+)\.py`", files):
            assert name not in table, f"{name}.py is listed twice"
            table[name] = int(number)
    return table


def test_the_design_maps_layers_are_the_imports_layers():
    deps = imports_of_each_script()
    derived, documented = derived_layers(deps), documented_layers()
    assert sorted(documented) == sorted(derived), \
        f"missing from docs/design.md: {sorted(set(derived) - set(documented))}; " \
        f"not a script: {sorted(set(documented) - set(derived))}"
    upward = [f"{a}.py (layer {documented[a]}) imports {b}.py (layer {documented[b]})"
              for a in deps for b in deps[a] if documented[b] >= documented[a]]
    assert not upward, "arrows that do not point down: " + "; ".join(upward)
    wrong = {f"{n}.py": (documented[n], derived[n]) for n in derived if documented[n] != derived[n]}
    assert not wrong, f"on another layer than its imports make it (documented, derived): {wrong}"
