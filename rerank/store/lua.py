"""Lua scripts with named KEYS and ARGV: one ordered tuple of names fixes both the script text and the call.

A template names its keys and arguments `KEYS.<name>` / `ARGV.<name>` (and constants `$NAME`,
string.Template style, filled first); `LuaScript.render` turns them into `KEYS[i]` / `ARGV[i]` by position in
the declared tuples, refusing a name it was not given, a declared name the script never uses and
an unfilled constant. `bind` builds the call's KEYS and ARGV lists from mappings by name, refusing
a missing or unknown name, so neither side can put a value in another's place.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Mapping

_NAMED = re.compile(r"\b(KEYS|ARGV)\.([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class LuaScript:
    keys: tuple[str, ...]  # KEYS[1..], in order
    args: tuple[str, ...]  # ARGV[1..], in order; the caller may pass more after them (`extra`)
    text: str  # the rendered Lua

    @classmethod
    def render(cls, template: str, keys: tuple[str, ...], args: tuple[str, ...], **constants: object) -> "LuaScript":
        """The script of `template` with named KEYS / ARGV by position; `constants` fill `$NAME`."""
        position = {"KEYS": {name: i for i, name in enumerate(keys, start=1)},
                    "ARGV": {name: i for i, name in enumerate(args, start=1)}}
        for table, names in (("KEYS", keys), ("ARGV", args)):
            if len(set(names)) != len(names):
                raise ValueError(f"{table}: a name is declared twice in {names}")
        used: dict[str, set[str]] = {"KEYS": set(), "ARGV": set()}

        def number(match: re.Match) -> str:
            table, name = match.group(1), match.group(2)
            if name not in position[table]:
                raise ValueError(f"{table}.{name}: not a declared name ({', '.join(position[table])})")
            used[table].add(name)
            return f"{table}[{position[table][name]}]"

        text = _NAMED.sub(number, string.Template(template).substitute(constants))
        for table, names in (("KEYS", keys), ("ARGV", args)):
            unused = [n for n in names if n not in used[table]]
            if unused:
                raise ValueError(f"{table}: declared but never used by the script: {unused}")
        return cls(keys, args, text)

    def bind(self, keys: Mapping[str, object], args: Mapping[str, object]) -> tuple[list, list]:
        """(KEYS, ARGV) lists of one call, from values by name."""
        return _ordered("KEYS", self.keys, keys), _ordered("ARGV", self.args, args)


def _ordered(table: str, names: tuple[str, ...], values: Mapping[str, object]) -> list:
    if len(values) != len(names) or values.keys() != set(names):
        missing, unknown = set(names) - set(values), set(values) - set(names)
        raise ValueError(f"{table}: missing {sorted(missing)}, unknown {sorted(unknown)}")
    return [values[name] for name in names]
