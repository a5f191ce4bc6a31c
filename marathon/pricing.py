"""Prices per model and what a request costs.  Pure.  (``Price`` lives in the protocol:
the orchestrator sends its table with each task so node budgets and the ledger agree.)

A price table maps model-name patterns (fnmatch, first match wins, most specific first) to
USD per million tokens for input, output, cache write and cache read, and USD per 1,000
requests for the server-side tools the API bills per use (``usage.server_tool_use``: web
search $10 per 1,000 by default; web fetch costs only its tokens).  Unknown models are
priced with the fallback and flagged, so nothing is ever metered as free by accident.
Override in marathon.toml: ``[prices."*sonnet*"] input = 3, output = 15, web_search = 10``.
"""

from __future__ import annotations

import fnmatch

__all__ = ["Price", "DEFAULT_PRICES", "DEFAULT_FALLBACK", "price_for", "cost", "merged_table"]

from marathon.protocol.messages import Price, Usage


# Shipped defaults (USD per million tokens), most specific patterns first.
DEFAULT_PRICES: dict[str, Price] = {
    "claude-opus-4-1*": Price(15.0, 75.0),
    "claude-opus-4-2025*": Price(15.0, 75.0),
    "claude-3-opus*": Price(15.0, 75.0),
    "*opus*": Price(5.0, 25.0),
    "*sonnet*": Price(3.0, 15.0),
    "claude-3-5-haiku*": Price(0.8, 4.0),
    "claude-3-haiku*": Price(0.25, 1.25),
    "*haiku*": Price(1.0, 5.0),
}
DEFAULT_FALLBACK = Price(15.0, 75.0)


def price_for(model: str | None, table: dict[str, Price], fallback: Price) -> tuple[Price, bool]:
    """(price, known).  ``known`` is False when the fallback was used."""
    name = (model or "").lower()
    for pattern, price in table.items():
        if fnmatch.fnmatchcase(name, pattern.lower()):
            return price, True
    return fallback, False


def cost(usage: Usage, price: Price) -> float:
    tokens = (
        usage.input_tokens * price.input
        + usage.output_tokens * price.output
        + usage.cache_creation_input_tokens * price.cw
        + usage.cache_read_input_tokens * price.cr
    ) / 1_000_000
    tools = (usage.web_search_requests * price.web_search + usage.web_fetch_requests * price.web_fetch) / 1000
    return tokens + tools


def merged_table(overrides: dict[str, Price]) -> dict[str, Price]:
    """Configured patterns first (they win), then the shipped defaults."""
    out = dict(overrides)
    for k, v in DEFAULT_PRICES.items():
        out.setdefault(k, v)
    return out
