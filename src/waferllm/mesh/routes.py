"""Route accounting: how many static routes (colors) each primitive needs per PE.

A primitive asks for the routes it needs through every PE. Within the router's budget
it runs on hardware routes; over budget, the region's policy decides: ``raise`` gives
:class:`RouteOverflowError`, ``relay`` makes the primitive fall back to software relays
(each relay is a routing stage costing beta cycles) and the ledger records it.
"""

from __future__ import annotations

from contextlib import contextmanager

from waferllm.errors import RouteOverflowError

POLICIES = ("relay", "raise")


class Routes:
    def __init__(self, region, policy: str = "relay", reserved: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"route policy must be one of {POLICIES}")
        self.region = region
        self.policy = policy
        self.budget = region.wafer.routable_routes_per_pe - reserved
        self.peak = 0
        self.peak_user = ""
        self.relayed: dict[str, int] = {}
        self._windows: list[int] = []  # most routes requested at once, per open window

    def request(self, name: str, per_pe: int, relayable: bool = True) -> bool:
        """True if the routes fit (hardware routing); False if the caller must relay in software."""
        if per_pe <= self.budget:
            if per_pe > self.peak:
                self.peak, self.peak_user = per_pe, name
            self._note(per_pe)
            return True
        if self.policy == "raise" or not relayable:
            raise RouteOverflowError(
                f"route overflow on region {self.region.describe()}: {name} needs {per_pe} routes per PE, "
                f"the router holds {self.budget} ({self.region.wafer.routable_routes_per_pe} routable colors). "
                + ("Use route policy 'relay' to fall back to software relays." if relayable else
                   "This primitive cannot relay in software; use a smaller region or another algorithm.")
            )
        self.peak = max(self.peak, self.budget)
        self.relayed[name] = self.relayed.get(name, 0) + 1
        self._note(per_pe)
        return False

    def absorb(self, other: "Routes") -> None:
        """Take in what a shape-only twin of this region requested (``Mesh.dry_twin``), as if
        the requests had been made here."""
        if other.peak > self.peak:
            self.peak, self.peak_user = other.peak, other.peak_user
        for name, n in other.relayed.items():
            self.relayed[name] = self.relayed.get(name, 0) + n
        if other.peak:
            self._note(other.peak)

    def _note(self, per_pe: int) -> None:
        if self._windows:
            self._windows[-1] = max(self._windows[-1], per_pe)

    @contextmanager
    def window(self):
        """Collect the most routes any request needed inside the block: ``w["peak"]``."""
        self._windows.append(0)
        result = {"peak": 0}
        try:
            yield result
        finally:
            result["peak"] = self._windows.pop()
            self._note(result["peak"])
