"""The split policy: which rows of a source's parts become train, val and test.

A plan is a list of `Take`s (a part's rows, under a name), computed from the parts' sizes alone,
so `registry.train_size` (for `--dry-run`, no data read) and `assemble` (on the data it read) get
their sizes from this one function. Imports neither torch nor any source's library.

Two policies, named by a source's record:

- `held_out`: the source's own parts are kept; a missing test part is held out of train by
  `data.test_fraction` (seed `data.split_seed + 1`), `data.subset` keeps the first N training
  images, a missing val part is held out by `data.val_fraction` (seed `data.split_seed`).
- `sampled`: one part in a meaningful order (a factor grid, whose first rows all share a shape)
  is permuted by `data.split_seed` and cut into test, then a `data.subset` random sample of the
  rest, then val out of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vaelab.errors import DataError

POLICIES = ("held_out", "sampled")
HELD_OUT_KEYS = ("data.val_fraction", "data.test_fraction", "data.split_seed")


def seeded_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): a fixed permutation of range(n) by `seed`."""
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 1:
        raise DataError(f"data.val_fraction={val_fraction} leaves an empty train or val split of {n} images")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass(frozen=True)
class Take:
    """Part `role` becomes rows `rows` of part `parent` (as it is at this step), named
    `name.format(name=<the parent's own name>)`."""

    role: str
    parent: str
    rows: np.ndarray
    name: str


@dataclass(frozen=True)
class Plan:
    takes: tuple[Take, ...]
    used: frozenset[str]  # which of HELD_OUT_KEYS decided a row (the rest changed nothing)

    def sizes(self, parts: Mapping[str, int]) -> dict[str, int]:
        """Images in train, val and test once the takes are applied to parts of these sizes."""
        sizes = dict(parts)
        for take in self.takes:
            sizes[take.role] = len(take.rows)
        return {role: sizes[role] for role in ("train", "val", "test")}


def held_out(parts: Mapping[str, int], spec: Any) -> Plan:
    takes: list[Take] = []
    used: set[str] = set()
    n = parts["train"]
    if "test" not in parts:
        keep, held = seeded_split(n, spec.test_fraction, spec.split_seed + 1)
        takes += [Take("test", "train", held, f"{{name}} (held out {spec.test_fraction:g} for test)"),
                  Take("train", "train", keep, "{name}")]
        used |= {"data.test_fraction", "data.split_seed"}
        n = len(keep)
    if spec.subset is not None and spec.subset < n:
        takes.append(Take("train", "train", np.arange(spec.subset), f"{{name}} (first {spec.subset})"))
        n = spec.subset
    if "val" not in parts:
        keep, held = seeded_split(n, spec.val_fraction, spec.split_seed)
        takes += [Take("val", "train", held, f"{{name}} (held out {spec.val_fraction:g} for val)"),
                  Take("train", "train", keep, "{name}")]
        used |= {"data.val_fraction", "data.split_seed"}
    return Plan(tuple(takes), frozenset(used))


def sampled(parts: Mapping[str, int], spec: Any) -> Plan:
    n = parts["train"]
    order = np.random.default_rng(spec.split_seed).permutation(n)
    n_test = int(round(n * spec.test_fraction))
    rest = order[n_test:] if spec.subset is None else order[n_test : n_test + spec.subset]
    n_val = int(round(len(rest) * spec.val_fraction))
    if n_val < 1 or len(rest) - n_val < 1:
        raise DataError(f"data.val_fraction={spec.val_fraction} leaves an empty train or val split")
    # Each part is rows of the whole set (its "train" part), so train is taken last.
    takes = (Take("test", "train", np.sort(order[:n_test]), "test"), Take("val", "train", np.sort(rest[:n_val]), "val"),
             Take("train", "train", np.sort(rest[n_val:]), "train"))
    return Plan(takes, frozenset(HELD_OUT_KEYS))


def plan(policy: str, parts: Mapping[str, int], spec: Any) -> Plan:
    """The takes that make train, val and test out of parts of these sizes ("train" always there)."""
    return {"held_out": held_out, "sampled": sampled}[policy](parts, spec)
