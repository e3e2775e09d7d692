"""Helpers shared by the benchmark scripts (imported as `benchmarks.common`; each script puts
the repository root on sys.path first)."""

from __future__ import annotations

import argparse
from typing import Callable, Sequence


def scenario_list(known: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse `type` for `--only a,b`: the names in their order, each one of `known`."""

    def parse(text: str) -> list[str]:
        only = [s for s in text.split(",") if s]
        unknown = sorted(set(only) - set(known))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown scenario(s) {unknown}; choose from {','.join(known)}")
        return only

    return parse
