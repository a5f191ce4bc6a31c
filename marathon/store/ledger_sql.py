"""The ledger's SQL, spelled once for every store: the columns are the fields of LedgerRow,
the usage sums those of Usage and UsageBucket.  Dialects differ only in placeholders."""

from __future__ import annotations

from typing import Any

from marathon.protocol.messages import USAGE_FIELDS, Usage
from marathon.store.models import LedgerRow, UsageBucket

LEDGER_NAMES: tuple[str, ...] = LedgerRow.__struct_fields__
LEDGER_COLS = ", ".join(LEDGER_NAMES)


def ledger_values(r: LedgerRow) -> list[Any]:
    return [getattr(r, n) for n in LEDGER_NAMES]


def ledger_row(values) -> LedgerRow:
    d = dict(zip(LEDGER_NAMES, values, strict=True))
    d["complete"], d["priced"] = bool(d["complete"]), bool(d["priced"])
    return LedgerRow(**d)


# one task's totals: every usage field, then the cost
TOTALS_SELECT = ", ".join(f"coalesce(sum({f}),0)" for f in (*USAGE_FIELDS, "cost_usd"))


def totals(row) -> tuple[Usage, float]:
    return Usage(*(int(x) for x in row[:-1])), float(row[-1])


# a usage summary: per group, the request and task counts, then the sums of these
_SUMMED = tuple(f for f in UsageBucket.__struct_fields__ if f not in ("key", "requests", "tasks", "compute_s"))


def summary_select(group: str, where: list[str]) -> str:
    sums = ", ".join(f"sum({f})" for f in _SUMMED)
    return (
        f"SELECT {group} AS k, count(*), count(DISTINCT task_id), {sums} "
        f"FROM ledger WHERE {' AND '.join(where)} GROUP BY 1 ORDER BY 1"
    )


def bucket(row) -> UsageBucket:
    sums: dict[str, Any] = {
        f: (float(v or 0.0) if f == "cost_usd" else int(v or 0)) for f, v in zip(_SUMMED, row[3:], strict=True)
    }
    return UsageBucket(key=row[0], requests=int(row[1]), tasks=int(row[2]), **sums)
