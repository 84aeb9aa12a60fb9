"""docs/operations.md documents every key of the appliance config, with its default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from appliance.config.schema import Config

DOC = Path(__file__).resolve().parent.parent.parent / "docs" / "operations.md"


def config_keys(cls=Config, section: str = "") -> dict[str, tuple[str, object]]:
    """{key: (section, default)} for every leaf of the config."""
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.update(config_keys(type(default), f.name))
        elif isinstance(default, dict):  # a free-form table checked by its owner
            out[f"[{f.name}]"] = (f.name, default)
        else:
            out[f"{section}.{f.name}" if section else f.name] = (section, default)
    return out


def documented_rows(text: str) -> dict[str, str]:
    """{section.key: default cell} from the reference tables, by the section headings."""
    rows, section = {}, ""
    reference = text.split("## Config file reference", 1)[1].split("\n## ", 1)[0]
    for line in reference.splitlines():
        heading = re.match(r"`\[(\w+)\]`", line)
        if heading:
            section = heading.group(1)
            rows[f"[{section}]"] = ""
        elif line.startswith("Top level:"):
            section = ""
        row = re.match(r"\| `(\w+)` \| (.*?) \|", line)
        if row:
            rows[f"{section}.{row.group(1)}" if section else row.group(1)] = row.group(2)
    return rows


def test_every_config_key_is_documented_with_its_default():
    rows = documented_rows(DOC.read_text())
    missing = sorted(set(config_keys()) - set(rows))
    assert not missing, (f"docs/operations.md, 'Config file reference', lacks: {missing}; "
                         "add a row (key, default, meaning) for each")
    for key, (_, default) in config_keys().items():
        if key.startswith("["):
            continue  # a table documented with its feature; its heading is enough here
        cell = rows[key]
        if isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        elif isinstance(default, str):
            shown = f'`"{default}"`'
        else:
            shown = f"`{default}`"
        assert cell.startswith(shown), f"{key}: the doc says {cell!r}, the default is {shown}"
