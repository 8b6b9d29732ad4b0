"""Every bad input of `tests/bad_inputs.py` (the table of docs/failures.md) gives one line `error: ...` naming what is
wrong, exit code 2, and no traceback; a training run is neither started nor left half-written."""

from __future__ import annotations

import pytest

from tests import bad_inputs
from tests.bad_inputs import CASES, prepare_trained, run_case


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return prepare_trained(tmp_path_factory.mktemp("bad_inputs"))


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40 and len({c.what for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_is_one_clear_line(case, trained, tmp_path):
    code, line = run_case(case, tmp_path)
    assert code == 2, line
    assert case.expect in line, line
    assert bad_inputs.TRAINED == trained
