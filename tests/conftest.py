"""Fixtures of the process-level tests."""
import shutil, tempfile
from pathlib import Path

import pytest


@pytest.fixture
def workdir():
    "A scratch folder removed afterwards (checkpoints are ~100 MB each: pytest's tmp_path would keep them)."
    d = Path(tempfile.mkdtemp(prefix='declip-test-'))
    yield d
    shutil.rmtree(d, ignore_errors=True)
