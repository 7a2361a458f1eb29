"""README.md's "Flags and environment" table against settings.OPTIONS: every flag listed, no other, and
every environment variable named."""

import re
from collections import Counter
from pathlib import Path

from netstatd import settings

README = Path(__file__).resolve().parents[2] / "README.md"


def flags_section() -> str:
    text = README.read_text()
    assert "\n## Flags and environment\n" in text
    return text.split("\n## Flags and environment\n", 1)[1].split("\n## ", 1)[0]


def table_flags() -> Counter:
    """The flags in the first cell of each row (a row may list two: "`--disable-tcp`, `--disable-udp`")."""
    rows = [line for line in flags_section().splitlines() if line.startswith("|")][2:]  # after header, rule
    return Counter(flag for row in rows for flag in re.findall(r"`(--[a-z0-9-]+)`", row.split("|")[1]))


def test_the_flag_table_lists_exactly_the_agents_flags():
    expected = Counter("--" + o.field.replace("_", "-") for o in settings.OPTIONS if o.flag)
    listed = table_flags()
    assert not expected - listed, f"missing from README.md's flag table: {sorted(expected - listed)}"
    assert not listed - expected, f"in README.md's flag table but not settings.OPTIONS: {sorted(listed - expected)}"


def test_every_environment_variable_is_named_in_the_readme():
    section = flags_section()
    for o in settings.OPTIONS:
        if o.env:
            assert f"`{o.env}`" in section, f"{o.env} (--{o.field.replace('_', '-')}) is not in README.md"
