"""The committed reports are what the code makes: the executed library notebooks in reports/notebooks/ show the cells
that nbs/ holds now (issue 37). `declip-reports notebooks` executes again only the notebooks whose copy is stale."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_executed_notebooks_are_current():
    from declip.study import REPORTS, stale_notebooks
    paths = sorted(ROOT.glob(REPORTS['notebooks']['notebooks']))
    assert len(paths) >= 17, paths
    stale = stale_notebooks(paths, ROOT / 'reports' / 'notebooks')
    assert not stale, (f"reports/notebooks/ is out of date for {[p.name for p in stale]} (their cells differ from nbs/): "
                       "run `declip-reports notebooks` and commit what it writes")
    index = json.loads((ROOT / 'reports' / 'notebooks' / 'index.json').read_text())
    assert {p.name for p in paths} <= set(index), 'reports/notebooks/index.json lacks some notebooks'
    assert all(len(r['commit'] or '') >= 7 for r in index.values()), index
