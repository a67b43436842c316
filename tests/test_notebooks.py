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


def notebook_defaults(path):
    "{name: default} of the parameters cell (its literals evaluated)."
    cell = next(c for c in json.loads(path.read_text())['cells'] if 'parameters' in c['metadata'].get('tags', []))
    namespace = {}
    exec(compile(''.join(cell['source']), str(path), 'exec'), namespace)
    return {n: namespace[n] for n in assigned_names(path)}


def test_train_notebook_cli_and_train_share_their_defaults():
    "One source of the run's parameters (issues 36, 37): `TrainParams`' fields are `train()`'s keywords, `declip-train`'s flags and the train notebook's parameters, with one default each."
    import inspect
    from dataclasses import fields
    from declip.train import train, train_parser, TrainParams
    params = {f.name: f.default for f in fields(TrainParams)}
    nb = notebook_defaults(NBS / 'train.ipynb')
    sig = {k: p.default for k, p in inspect.signature(train).parameters.items() if p.default is not inspect.Parameter.empty}
    cli = vars(train_parser().parse_args([]))
    assert set(params) <= set(sig) and set(params) <= set(cli), 'a field is missing from train() or declip-train'
    own = {'overrides', 'nproc', 'smoke'}                    # the notebook's own: switches as a dict, processes, a smoke run
    assert set(nb) - own <= set(params), f'notebook parameters that are not TrainParams fields: {sorted(set(nb) - own - set(params))}'
    shared = sorted(set(nb) & set(params))
    assert {'resume', 'image_encoder', 'output_dir', 'eval_every', 'epochs', 'method'} <= set(shared), shared
    differ = {k: (nb[k], params[k], sig[k], cli[k]) for k in shared if not (nb[k] == params[k] == sig[k] == cli[k])}
    assert not differ, f'notebook / TrainParams / train() / declip-train defaults differ: {differ}'


def test_papermill_terminal_shows_the_run_and_its_summary(tmp_path):
    "Under papermill the trainer's own lines, its progress bar and its closing summary reach papermill's terminal (issue 37, item 5)."
    import os, subprocess, sys
    env = {k: v for k, v in os.environ.items() if k not in ('PYTEST_CURRENT_TEST', 'IN_TEST', 'DECLIP_ECHO')}   # a user's shell
    env.update(OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', MPLBACKEND='Agg')
    out = tmp_path / 'run'
    p = subprocess.run([str(Path(sys.executable).parent / 'papermill'), str(NBS / 'train.ipynb'), str(tmp_path / 'train.ipynb'),
                        '-p', 'smoke', 'True', '-p', 'output_dir', str(out)],
                       cwd=NBS, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    terminal = p.stdout + p.stderr
    assert f'declip-train: finished declip: 3 steps' in terminal and f'output folder: {out}' in terminal, terminal[-3000:]
    assert 'train: 100%' in terminal and '3/3' in terminal, terminal[-3000:]          # the trainer's own bar, not only papermill's cells
    executed = json.loads((tmp_path / 'train.ipynb').read_text())
    text = ''.join(o.get('text', '') if isinstance(o.get('text', ''), str) else ''.join(o['text'])
                   for c in executed['cells'] for o in c.get('outputs', []))
    assert 'declip-train: finished declip' in text and 'train: 100%' not in text      # the notebook keeps the summary, not the bar
