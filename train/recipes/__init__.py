"""Training recipes: scripts that build their own data and produce a finished model.

    m1jax train recipe arithmetic [--out DIR | --install] [section.key=value ...]
"""

from __future__ import annotations

import sys

RECIPES = ("arithmetic",)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in RECIPES:
        print(f"usage: m1jax train recipe {{{','.join(RECIPES)}}} [options]", file=sys.stderr)
        return 2
    from train.recipes import arithmetic
    return arithmetic.main(argv[1:])
