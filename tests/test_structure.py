"""The library's rooms: a module imports only from modules whose notebooks come before its own (the data flows one way)."""
import ast, re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / 'declip'

def notebook_of(path: Path) -> str | None:
    "The notebook a module is exported from (nbdev's header), e.g. '06a_runs'."
    m = re.search(r'File to edit: \.\./nbs/(\S+)\.ipynb', path.read_text()[:600])
    return m.group(1) if m else None

def imported_modules(path: Path) -> set[str]:
    "The declip modules `path` imports, at module level or inside functions (`from .x import`, `from declip.x import`, `import declip.x`)."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 1: found.add(mod.split('.')[0])
            elif mod.startswith('declip.'): found.add(mod.split('.')[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('declip.')}
    return found - {''}

def test_imports_follow_the_notebook_order():
    order = {p.stem: notebook_of(p) for p in PKG.glob('*.py') if notebook_of(p)}
    assert len(order) >= 19, order
    against = [f"{m} ({nb}) imports {o} ({order[o]})" for m, nb in order.items() for o in imported_modules(PKG / f'{m}.py')
               if o in order and order[o] >= nb]
    assert not against, 'imports against the notebook order: ' + '; '.join(against)

def test_the_check_sees_a_backward_import(tmp_path):
    bad = tmp_path / 'x.py'
    bad.write_text('from .train import train\nimport declip.study\ndef f():\n    from declip.inference import evaluate\n')
    assert imported_modules(bad) == {'train', 'study', 'inference'}
