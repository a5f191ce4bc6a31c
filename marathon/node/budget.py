"""One task's budget (tokens and/or dollars) under concurrent requests.  Pure: no I/O, no clock.

The metering proxy asks :meth:`Budget.reserve` before it forwards a request and calls
:meth:`Budget.settle` when the response has ended, however it ended (complete, the client
hung up, the upstream failed, cancelled).  A request that cannot reserve is never forwarded
(the proxy answers 402).

**The rule.**  Let ``B`` be a budget, ``U`` what settled requests used, and ``H`` what the
requests in flight hold: each holds the larger of its reservation and the usage the proxy has
already read in its response (``message_start`` carries the input tokens).  A request is
forwarded only while ``U + H < B``, and it reserves ``r = min(its max_tokens, B - U - H)``
tokens (a request without ``max_tokens`` reserves :data:`DEFAULT_RESERVE`).  For a dollar
budget the same holds in dollars, the reservation priced at the model's *output* price (the
dearest kind of token, and the only kind ``max_tokens`` bounds).

**The bound.**  Take the last request ever forwarded, ``L``.  When it was admitted,
``U + H + r_L <= B``, and every other forwarded request had either settled (it is in ``U``)
or was in flight (it is in ``H``, holding at least its reservation).  So the final metered
total is

    T  <=  B + sum over F of (a_j - r_j)  <=  B + sum over F of a_j

where ``F`` is the set of requests in flight when ``L`` was admitted (``L`` included), ``a_j``
what request ``j`` actually used and ``r_j`` its reservation.  In words: the total exceeds the
budget only by what the requests already in flight when the budget was reached used beyond
their reservations -- their input tokens (never reserved: unknown before the answer) and the
output of a request whose reservation was clipped to the little that was left.  Requests
arriving after that are refused, and cost nothing.  Dollars: the same bound, in dollars.

A task is *stopped* (``exhausted``) only when settled usage alone reaches a budget; what is
merely reserved blocks new requests but never fails the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

from marathon.pricing import DEFAULT_FALLBACK, cost, price_for
from marathon.protocol.messages import Price, Usage

DEFAULT_RESERVE = 32_000  # tokens reserved for a request that names no max_tokens (the API requires one)


@dataclass(eq=False)
class Reservation:
    model: str | None
    tokens: int  # reserved towards the token budget
    usd: float  # reserved towards the dollar budget
    live: Callable[[], Usage] | None = None  # what the proxy has read of its usage so far
    settled: bool = False


def _plural(n: int) -> str:
    return f"{n} request{'s' if n != 1 else ''}"


class Budget:
    def __init__(
        self,
        max_tokens: int | None = None,
        max_cost: float | None = None,
        *,
        prices: dict[str, Price] | None = None,
        fallback: Price = DEFAULT_FALLBACK,
        default_reserve: int = DEFAULT_RESERVE,
    ):
        self.max_tokens, self.max_cost = max_tokens, max_cost
        self.prices, self.fallback = prices or {}, fallback
        self.default_reserve = default_reserve
        self.usage = Usage()  # settled
        self.cost = 0.0  # settled, USD
        self._open: list[Reservation] = []

    @property
    def in_flight(self) -> int:
        return len(self._open)

    def price(self, model: str | None) -> Price:
        return price_for(model, self.prices, self.fallback)[0]

    def held(self) -> tuple[int, float]:
        """(tokens, USD) the requests in flight hold: reservation, or more if already used."""
        tokens, usd = 0, 0.0
        for r in self._open:
            seen = r.live() if r.live is not None else None
            tokens += max(r.tokens, seen.total if seen is not None else 0)
            usd += max(r.usd, cost(seen, self.price(r.model)) if seen is not None else 0.0)
        return tokens, usd

    def reserve(self, model: str | None, max_tokens: object) -> Reservation | str:
        """A reservation for one request, or the reason it may not be forwarded."""
        want = max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else None
        want = self.default_reserve if want is None or want < 0 else want
        tokens, usd = 0, 0.0
        if self.max_tokens is not None or self.max_cost is not None:
            h_tokens, h_usd = self.held()
            if self.max_tokens is not None:
                left = self.max_tokens - self.usage.total - h_tokens
                if left <= 0:
                    return self._refusal_tokens(h_tokens)
                tokens = min(want, left)
            if self.max_cost is not None:
                left_usd = self.max_cost - self.cost - h_usd
                if left_usd <= 0:
                    return self._refusal_cost(h_usd)
                usd = min(want * self.price(model).output / 1_000_000, left_usd)
        res = Reservation(model=model, tokens=tokens, usd=usd)
        self._open.append(res)
        return res

    def settle(self, res: Reservation, usage: Usage, model: str | None) -> None:
        """The request ended: release its reservation and count what it really used."""
        if res.settled:
            return
        res.settled = True
        self._open.remove(res)
        self.usage = self.usage + usage
        self.cost += cost(usage, self.price(model or res.model))

    def exhausted(self) -> str | None:
        """Why the task must stop (settled usage reached a budget), or None."""
        if self.max_tokens is not None and self.usage.total >= self.max_tokens:
            return self._refusal_tokens(None)
        if self.max_cost is not None and self.cost >= self.max_cost:
            return self._refusal_cost(None)
        return None

    def _refusal_tokens(self, held: int | None) -> str:
        text = f"token budget exhausted: {self.usage.total} of {self.max_tokens} tokens used"
        if held and self._open:
            text += f", {held} more held by {_plural(len(self._open))} still in flight"
        return text

    def _refusal_cost(self, held: float | None) -> str:
        text = f"cost budget exhausted: ${self.cost:.4f} of ${self.max_cost:.4f} spent"
        if held and self._open:
            text += f", ${held:.4f} more held by {_plural(len(self._open))} still in flight"
        return text
