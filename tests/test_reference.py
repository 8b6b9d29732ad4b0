"""The measured reference is data in the repository and in the wheel, and every row of it names a
configuration of this toolkit that runs."""

from __future__ import annotations

import csv
import fnmatch
import tomllib
from pathlib import Path

from setr_lowmem.sizing import reference

ROOT = Path(__file__).resolve().parent.parent


def test_the_reference_rows_are_read_from_the_csv_in_docs():
    linked = ROOT / "docs" / "reference" / "h100_plain_pytorch.csv"
    assert linked.resolve() == reference.H100_CSV.resolve()  # docs/ shows the package's one copy
    with open(linked, newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(reference.ROWS) == len(lines) == 21
    assert [r.label for r in reference.ROWS] == [line["label"] for line in lines]
    assert sum(1 for r in reference.ROWS if r.config) == 20  # one row has no policy of this toolkit
    for r in reference.ROWS:
        assert r.img_s > 0 and r.allocated > 0 and (r.reserved is None or r.reserved >= r.allocated)


def test_every_configured_reference_row_loads_with_its_batch():
    for r in reference.ROWS:
        if not r.config:
            continue
        cfg = r.configured()
        assert (cfg.train.micro_batch, cfg.train.accumulation()) == (r.micro_batch, r.accumulation), r.label
        assert cfg.model.pretrained == ""
        keys = [o.split("=")[0] for o in r.overrides]
        assert len(keys) == len(set(keys)), r.label  # each setting once: the row reads as one configuration


def test_the_sizing_data_is_package_data():
    """`pip install .` ships every file the sizing room reads: pyproject's package-data names them."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["setr_lowmem"]
    package = ROOT / "setr_lowmem"
    files = [p for p in reference.DATA.iterdir() if p.is_file()]
    assert {p.name for p in files} >= {"h100_plain_pytorch.csv", "cards.csv", "speed_model.json"}
    for path in files:
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in data), relative
