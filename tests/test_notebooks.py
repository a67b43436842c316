"""The papermill notebooks as a user meets them: every parameter listed with its type and help."""
import ast, json
from pathlib import Path

import pytest
from papermill.inspection import inspect_notebook

NBS = Path(__file__).resolve().parent.parent / 'nbs'
PAPERMILL_NOTEBOOKS = sorted(p for p in NBS.glob('*.ipynb')
                             if any('parameters' in c['metadata'].get('tags', []) for c in json.loads(p.read_text())['cells']))


def assigned_names(path):
    "The names the parameters cell assigns, read with Python's own parser (what papermill has to find)."
    cell = next(c for c in json.loads(path.read_text())['cells'] if 'parameters' in c['metadata'].get('tags', []))
    body = ast.parse(''.join(cell['source'])).body
    return [n.target.id if isinstance(n, ast.AnnAssign) else t.id
            for n in body if isinstance(n, (ast.Assign, ast.AnnAssign)) for t in ([n.target] if isinstance(n, ast.AnnAssign) else n.targets)]


def test_there_are_papermill_notebooks():
    assert {'train.ipynb', 'evaluate.ipynb', 'ablations.ipynb', 'data_efficiency.ipynb', 'openclipart_study.ipynb'} <= {p.name for p in PAPERMILL_NOTEBOOKS}


@pytest.mark.parametrize('path', PAPERMILL_NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_sees_every_parameter(path):
    seen = inspect_notebook(str(path))
    names = assigned_names(path)
    assert names and set(names) == set(seen), f'{path.name}: papermill misses {sorted(set(names) - set(seen))}'
    untyped = [n for n, p in seen.items() if p['inferred_type_name'] in ('None', 'Unknown type')]
    unhelped = [n for n, p in seen.items() if not p['help'].strip()]
    assert not untyped and not unhelped, f'{path.name}: no type for {untyped}, no help for {unhelped}'


@pytest.mark.parametrize('path', PAPERMILL_NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_runs_on_its_own(path):
    "The parameters cell is the first code a kernel runs: it must not need an import (e.g. an unquoted `Optional`)."
    cell = next(c for c in json.loads(path.read_text())['cells'] if 'parameters' in c['metadata'].get('tags', []))
    namespace = {}
    exec(compile(''.join(cell['source']), str(path), 'exec'), namespace)
    assert set(assigned_names(path)) <= set(namespace)
