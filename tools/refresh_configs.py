"""Rewrite every shipped config (setr_lowmem/configs/*.yaml) complete, with each key's description,
keeping its values and its header comment: run after adding or documenting a config field.

    python tools/refresh_configs.py

A new field takes its default in every file; edit the files afterwards where a config needs another
value. `tests/test_config.py` checks that every shipped file is what this writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from setr_lowmem.config import CONFIG_DIR, _merge, config_from_dict, config_to_dict, dump_config  # noqa: E402


def header(text: str) -> str:
    """The leading comment lines of a config file, without their '# '."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines)


def main() -> None:
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        text = path.read_text()
        # the file's values over the defaults: a key the file lacks (a new field) takes its default
        cfg = config_from_dict(_merge(config_to_dict(config_from_dict({"name": path.stem})), yaml.safe_load(text)),
                               str(path))
        path.write_text(dump_config(cfg, header(text)))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
