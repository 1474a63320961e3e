"""Which packs a verify reads the data of, when it should not read them all."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from raksha.domain.errors import InvalidInput


@dataclass(frozen=True)
class DataSubset:
    """The packs whose data a verify reads; the others are checked for presence and size only.

    ``n/t``: the n-th of t groups of packs, by pack id: running 1/t, 2/t ... t/t reads every pack once,
    so a large vault's data can be re-read over t days. ``p%``: each pack with that chance, drawn anew
    every run. (restic's ``check --read-data-subset`` takes the same two forms.)"""

    spec: str
    group: int = 0  # n - 1
    groups: int = 1  # t
    percent: float = 100.0

    @classmethod
    def parse(cls, text: str) -> DataSubset:
        spec = text.strip()
        if m := re.fullmatch(r"(\d+)/(\d+)", spec):
            n, t = int(m[1]), int(m[2])
            if 1 <= n <= t:
                return cls(spec, group=n - 1, groups=t)
        elif m := re.fullmatch(r"(\d+(?:\.\d+)?)%", spec):
            percent = float(m[1])
            if 0 < percent <= 100:
                return cls(spec, percent=percent)
        raise InvalidInput(f"not a data subset: {text!r} (n/t with 1 <= n <= t, e.g. 1/7; or a percentage "
                           "above 0 and at most 100, e.g. 10%)", code="SUBSET_INVALID")

    @property
    def fraction(self) -> float:
        return self.percent / 100 / self.groups

    def includes(self, pack_id: bytes, rng: random.Random) -> bool:
        if self.groups > 1:
            return int.from_bytes(pack_id[:8], "big") % self.groups == self.group
        return self.percent >= 100 or rng.random() * 100 < self.percent
