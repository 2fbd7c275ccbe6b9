"""tests/mutations.toml stays applicable: a code change that moves a mutated line must update its entry
(`make mutation-check` would otherwise stop at that entry, and its mechanism would go unguarded)."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_mutation_finds_its_text_exactly_once_and_names_existing_tests():
    entries = tomllib.loads((ROOT / "tests" / "mutations.toml").read_text())["mutation"]
    assert len(entries) > 300
    stale = [(e["name"], (ROOT / e["file"]).read_text().count(e["find"])) for e in entries
             if (ROOT / e["file"]).read_text().count(e["find"]) != 1]
    assert not stale, stale
    assert all(e["find"] != e["replace"] for e in entries)
    missing = {t.split("::")[0] for e in entries for t in e["tests"]} - {
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")}
    assert not missing, missing
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
