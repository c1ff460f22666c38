"""`Source`: one data source as a record, and the rule that every data key it is given either
changes what it names or is refused by name.

A source knows its image shape, the size of each part it has, its classes and the data keys it
honours, all from the spec without reading images (so `--dry-run` and spec checks import no
torch); `read` returns its parts, and `vaelab.data.assemble` does the rest for every source
alike: held-out splits, subset, binarisation, augmentation and placement.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from vaelab import registry
from vaelab.checks import show
from vaelab.data.splits import POLICIES, plan
from vaelab.errors import SpecError

if TYPE_CHECKING:
    from vaelab.data.model import Part

# What `assemble` applies to every source. data.binarize needs grey images that are not binary already.
SHARED_KEYS = frozenset({"data.dataset", "data.val_fraction", "data.split_seed", "data.subset", "data.cache_dir",
                         "data.storage", "data.memory_budget", "data.augment", "data.binarize"})
# Values that ask nothing of a source without the feature: no source downloads when told not to.
INERT: dict[str, Any] = {"data.download": False}


class Takeable(Protocol):
    """A part `assemble` takes rows of: a `Part`, or one read only where rows are taken (dSprites' grid)."""

    def __len__(self) -> int: ...

    def take(self, rows: np.ndarray, name: str) -> Part: ...


@dataclass(frozen=True)
class Read:
    """What a source's `read` gives: its parts ("train", and "val" / "test" where it has them)."""

    parts: dict[str, Takeable]
    class_names: tuple[str, ...]
    description: str
    factors: Any = None  # ground-truth factor data, if the source has it


@dataclass(frozen=True)
class Source:
    name: str  # data.dataset
    read: Callable[[Any, bool], Read]  # (data spec, show_progress) -> its parts; imports torch when called
    shape: Callable[[Any], tuple[int, int, int]]  # (C, H, W), from the spec alone
    sizes: Callable[[Any], dict[str, int]]  # images per part it has, counted without decoding
    classes: Callable[[Any], int]  # how many classes label its images (at least 1)
    keys: frozenset[str] = frozenset()  # its own data keys besides SHARED_KEYS; "data.hf." names a section
    policy: str = "held_out"  # vaelab.data.splits.POLICIES
    factors: bool = False  # ground-truth factors of variation (the disentanglement metrics need them)
    binary: bool = False  # its pixels are 0 or 1 already

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"{self.name}: split policy {self.policy!r} is not one of {POLICIES}")

    def binarizes(self, spec: Any) -> bool:
        """Whether data.binarize means something here: grey images (Salakhutdinov & Murray 2008 sample
        each grey level as the chance of a white pixel) that are not binary already. On RGB it is
        refused: per-channel bits (eight colours) are no protocol anyone compares against."""
        return not self.binary and self.shape(spec)[0] == 1

    def honours(self, key: str, spec: Any) -> bool:
        """Whether a value of the dotted data key changes what this source gives."""
        if key == "data.binarize":
            return self.binarizes(spec)
        sections = tuple(k for k in self.keys if k.endswith("."))
        return key in SHARED_KEYS or key in self.keys or key.startswith(sections)

    def check(self, spec: Any) -> None:
        """Refuse, by name, a key set to a value this source would silently ignore."""
        if spec.binarize != "none" and not self.binarizes(spec):
            if self.binary:
                raise SpecError(f"data.binarize: {self.name} images are binary already (0 or 1); leave it out")
            raise SpecError(f"data.binarize: {spec.binarize} needs grey images and {self.name} gives "
                            f"{self.shape(spec)[0]} channels; set data.channels: 1 or leave data.binarize out")
        for key, value in changed(spec):
            if self.honours(key, spec) or (key in INERT and value == INERT[key]):
                continue
            users = [name for name in registry.names("dataset") if registry.source(name).honours(key, spec)]
            where = f"only {', '.join(users)} use it" if users else "no data set uses it"
            raise SpecError(f"{key}: {show(value)} does nothing for data.dataset {self.name} ({where}); leave it out")

    def split_sizes(self, spec: Any) -> dict[str, int]:
        """Images in train, val and test, from the parts' sizes and the split policy (reads no image)."""
        parts = self.sizes(spec)
        if parts.get("train", 0) == 0:  # nothing there yet (a folder to fill): nothing to split
            return {"train": 0, "val": parts.get("val", 0), "test": parts.get("test", 0)}
        return plan(self.policy, parts, spec).sizes(parts)


def changed(spec: Any, prefix: str = "data.") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every field of a data spec whose value is not its default."""
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if dataclasses.is_dataclass(value):
            yield from changed(value, f"{prefix}{field.name}.")
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:  # a field without a default: any value is the one asked for
            continue
        if value != default:
            yield f"{prefix}{field.name}", value
