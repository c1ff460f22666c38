"""Which folder (or dataset split) is the training, validation and test split.

People name splits `train/`, `Training Data/`, `valid/`, `testing/`...; names are
compared lower-case with spaces, '_' and '-' removed, against the usual names below.
A name the spec gives (`data.splits.train`) wins. Two names that both look like one
split are an error naming both, never a guess. Imports neither torch nor datasets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from vaelab.errors import DataError

ROLES = ("train", "val", "test")
ROLE_WORDS = {"train": "training", "val": "validation", "test": "test"}

_STEMS = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing"),
}
# Each stem alone or followed by "data" or "set": "Training Data", "train_set", "testset".
SPLIT_ALIASES: dict[str, frozenset[str]] = {
    role: frozenset(stem + tail for stem in stems for tail in ("", "data", "set"))
    for role, stems in _STEMS.items()
}


def normal_name(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


def role_of(name: str) -> str | None:
    """The split role a folder or split name looks like, or None."""
    normal = normal_name(name)
    return next((role for role, aliases in SPLIT_ALIASES.items() if normal in aliases), None)


def recognise_splits(names: Iterable[str], explicit: Mapping[str, str | None], what: str,
                     skip: Iterable[str] = ()) -> dict[str, str]:
    """role -> name, for the roles found among `names`: `explicit[role]` when given (it must
    exist), else the one name that looks like the role; roles in `skip` are settled elsewhere
    and not looked for. `what` names the place in errors."""
    names = list(names)
    found: dict[str, str] = {}
    for role in ROLES:
        given = explicit.get(role)
        if given is None:
            continue
        if given not in names:
            raise DataError(f"data.splits.{role}: no split {given!r} in {what}; it has: "
                            f"{', '.join(repr(n) for n in sorted(names)) or 'nothing'}")
        found[role] = given
    taken, settled = set(found.values()), set(skip)
    for role in ROLES:
        if role in found or role in settled:
            continue
        matches = sorted(n for n in names if n not in taken and role_of(n) == role)
        if len(matches) > 1:
            listed = " and ".join(repr(m) for m in matches)
            raise DataError(f"{what}: {listed} both look like the {ROLE_WORDS[role]} split; "
                            f"name one with data.splits.{role}")
        if matches:
            found[role] = matches[0]
    return found


def require_train(found: Mapping[str, object], names: Iterable[str], what: str) -> None:
    """A test or validation split without a training split is a layout vaelab cannot guess."""
    if found and "train" not in found:
        present = ", ".join(f"{role}={name!s}" for role, name in found.items())
        raise DataError(f"{what}: found {present} but no training split among "
                        f"{', '.join(repr(n) for n in sorted(names))}; name it with data.splits.train")
