"""What every data source shares: a source's parts made into train, val and test (held out by
seed, subset), binarised, and placed on the device resident or streamed.

A split's images are an `Images` store (`vaelab.data.store`): indexing it gives a float
batch in [0, 1] on the device, so training and evaluation code is the same for both.
Images are resident (no DataLoader, batches are index slices, no host-device copies)
when they fit `data.memory_budget`, else read from the decoded-image cache batch by
batch, a few batches ahead, in the same seeded order.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab import registry
from vaelab.data.cache import array_digest, cache_key, load_cached, write_cache
from vaelab.data.memory import budget_bytes, choose_storage, show_bytes
from vaelab.data.model import ImageData, Part, Split
from vaelab.data.sources.base import Source, Takeable, changed
from vaelab.data.splits import HELD_OUT_KEYS, Plan, plan
from vaelab.data.store import DiskImages, Images, ResidentImages
from vaelab.errors import SpecError


def load_data(spec: Any, device: torch.device, show_progress: bool = True) -> ImageData:
    """The data set a data spec names (data.dataset), on `device`."""
    return assemble(registry.source(spec.dataset), spec, device, show_progress)


def assemble(source: Source, spec: Any, device: torch.device, show_progress: bool = True) -> ImageData:
    source.check(spec)  # a spec built in code, not parsed, is held to the same keys
    read = source.read(spec, show_progress)
    split_plan = plan(source.policy, {role: len(part) for role, part in read.parts.items()}, spec)
    _check_held_out(split_plan, spec, read.parts)
    parts = _taken(read.parts, split_plan)
    if spec.binarize != "none":
        parts = _binarize(parts, spec.binarize, spec.split_seed, device)
    splits, storage = _place(parts, spec, device)
    return ImageData(
        train=splits["train"], val=splits["val"], test=splits["test"],
        shape=splits["train"].x.shape,
        class_names=read.class_names,
        description=read.description,
        dynamic_binarize=spec.binarize == "dynamic",
        augment=spec.augment,
        name=spec.dataset,
        storage=storage,
        factors=read.factors,
    )


def _check_held_out(split_plan: Plan, spec: Any, parts: dict[str, Takeable]) -> None:
    """val_fraction, test_fraction and split_seed say how parts a source lacks are held out; where it
    has them all (and no bits are drawn by split_seed), a value given for them would change nothing."""
    used = split_plan.used | ({"data.split_seed"} if spec.binarize != "none" else set())
    for key, value in changed(spec):
        if key in HELD_OUT_KEYS and key not in used:
            has = ", ".join(role for role in ("train", "val", "test") if role in parts)
            raise SpecError(f"{key}: {value} does nothing: data.dataset {spec.dataset} here has its own {has} "
                            "splits, so nothing is held out; leave it out")


def _taken(parts: dict[str, Takeable], split_plan: Plan) -> dict[str, Part]:
    out = dict(parts)
    for take in split_plan.takes:
        parent = out[take.parent]
        name = take.name.format(name=parent.info.name) if isinstance(parent, Part) else take.name
        out[take.role] = parent.take(take.rows, name)
    placed = {role: part for role, part in out.items() if isinstance(part, Part)}
    if set(placed) != set(out):  # a source's lazy part must be taken whole into train, val and test
        raise AssertionError(f"parts left untaken: {sorted(set(out) - set(placed))}")
    return placed


def _binarized(split: Split, generator: torch.Generator) -> Split:
    bits = torch.bernoulli(split.x[:], generator=generator).mul_(255).to(torch.uint8)
    # The digest of the bits themselves: they depend on the seed, the split and the device.
    digest = array_digest(bits.cpu().numpy(), split.y.cpu().numpy())
    info = None if split.info is None else replace(split.info, digest=digest)
    return Split(ResidentImages(bits), split.y, info)


def _binarize(parts: dict[str, Part], mode: str, seed: int, device: torch.device) -> dict[str, Part]:
    """Grey levels as the chance of a white pixel (Salakhutdinov & Murray 2008). Evaluation sets are
    binarised once, with a fixed seed, so every run sees the same bits; training images once (static)
    or anew per batch by the training loop (dynamic). Bits are drawn on the device, then placed like
    any images."""
    splits = {role: Split(ResidentImages(p.images.resident().data.to(device)), torch.from_numpy(p.labels), p.info)
              for role, p in parts.items()}
    generator = torch.Generator(device=device).manual_seed(10_000 + seed)
    drawn = {"val": _binarized(splits["val"], generator), "test": _binarized(splits["test"], generator)}
    if mode == "static":
        drawn["train"] = _binarized(splits["train"], generator)
    return {role: Part(drawn[role].x, p.labels, drawn[role].info or p.info) if role in drawn else
            Part(splits[role].x, p.labels, p.info) for role, p in parts.items()}


def _spill(images: Images, cache_dir: Path, digest: str, device: torch.device) -> DiskImages:
    """Resident images written to the cache (once: keyed by their content), to be streamed
    (a budget smaller than a small set)."""
    key = cache_key("spilled", digest)
    cached = load_cached(cache_dir, key)
    if cached is None:
        data = images.resident().data.cpu().numpy()
        cached = write_cache(cache_dir, key, iter(data), [0] * len(data), images.shape, f"spilled {digest[:12]}")
    return cached.images(device)


def _place(parts: dict[str, Part], spec: Any, device: torch.device) -> tuple[dict[str, Split], str]:
    """Splits on the device, resident or streamed by data.storage and data.memory_budget."""
    needed = sum(part.images.nbytes for part in parts.values())
    budget = budget_bytes(spec.memory_budget, device)
    storage = choose_storage(spec.storage, needed, budget)
    if storage == "stream" and spec.storage == "auto":
        print(f"vaelab: images take {show_bytes(needed)}, more than data.memory_budget ({show_bytes(budget)}): "
              f"streaming them from {spec.cache_dir}", file=sys.stderr)
    placed = {}
    for role, part in parts.items():
        on_device: Images = part.images
        if isinstance(on_device, DiskImages):  # read straight to the device, chunk by chunk
            on_device = DiskImages(on_device.path, on_device.count, on_device.shape, device, on_device.rows)
        if storage == "resident":
            images: Images = on_device.resident()
            if images.device != device:
                images = ResidentImages(images.resident().data.to(device))
        elif isinstance(on_device, DiskImages):
            images = on_device
        else:
            images = _spill(part.images, Path(spec.cache_dir).expanduser(), part.info.digest, device)
        placed[role] = Split(images, torch.from_numpy(np.ascontiguousarray(part.labels)).to(device), part.info)
    return placed, storage
