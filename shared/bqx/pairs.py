"""The 28 FX pairs: every combination of the 8 major currencies."""

from __future__ import annotations

from itertools import combinations

from bqx.errors import UnknownPair

CURRENCIES = ("eur", "gbp", "aud", "nzd", "usd", "cad", "chf", "jpy")  # market quoting priority

PAIRS: tuple[str, ...] = tuple(a + b for a, b in combinations(CURRENCIES, 2))


def validate_pair(pair: object) -> str:
    """Return the pair in canonical form or raise UnknownPair; never trusts its input."""
    if not isinstance(pair, str) or len(pair) > 16:
        raise UnknownPair(pair)
    canonical = pair.strip().lower()
    if canonical not in PAIRS:
        raise UnknownPair(pair)
    return canonical
