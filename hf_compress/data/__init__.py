"""Data: the real data that ships inside the package, so every default runs offline (here), plain-text files read as
documents (`data.text`), and the calibration batches read from a training dataloader (`data.calibration`)."""

from __future__ import annotations

from importlib import resources

ROTTEN_TOMATOES = "rotten_tomatoes"
_SPLITS = ("train", "validation", "test")


def rotten_tomatoes_path() -> str:
    """Path of the shipped Rotten Tomatoes CSV (see `hf_compress/data/LICENSE.md`)."""
    return str(resources.files(__package__).joinpath("rotten_tomatoes.csv.gz"))


def load_rotten_tomatoes(max_train: int | None = None, max_eval: int | None = None, seed: int = 42):
    """Load the shipped Rotten Tomatoes sentiment data as a `datasets.DatasetDict`.

    Args:
        max_train (`int`, *optional*):
            Keep a seeded, shuffled subset of this many training rows (for quick runs).
        max_eval (`int`, *optional*):
            Keep the first this-many rows of `validation` and `test` (the split order is already random).
        seed (`int`, *optional*, defaults to `42`):
            Seed of the training subset.

    Returns:
        `DatasetDict` with `train` (9,752), `validation` (1,000) and `test` (2,000) splits of columns `text`
        and `label` (`0` = rotten, `1` = fresh), a fixed stratified split.
    """
    import datasets

    for name, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and value <= 0:
            raise ValueError(f"`{name}` must be a positive number of rows, got {value}.")
    full = datasets.load_dataset("csv", data_files=rotten_tomatoes_path(), split="train")
    full = full.cast_column("label", datasets.ClassLabel(names=["rotten", "fresh"]))
    out = datasets.DatasetDict(
        {s: full.filter(lambda split: split == s, input_columns="split").remove_columns("split") for s in _SPLITS}
    )
    if max_train is not None and max_train < len(out["train"]):
        out["train"] = out["train"].shuffle(seed=seed).select(range(max_train))
    if max_eval is not None:
        for s in ("validation", "test"):
            out[s] = out[s].select(range(min(max_eval, len(out[s]))))
    return out


HAMLET = "hamlet"
# Every fifth scene (the 3rd, 8th, 13th and 18th of 20) is held out: a split by document, so no held-out line
# shares a scene with a training line.
_HAMLET_HELD_OUT_EVERY = 5


def hamlet_path() -> str:
    """Path of the shipped text of Shakespeare's *Hamlet* (public domain; see `hf_compress/data/LICENSE.md`)."""
    return str(resources.files(__package__).joinpath("hamlet.txt.gz"))


def load_hamlet():
    """The shipped *Hamlet* as a `datasets.DatasetDict` of whole scenes, split by scene.

    Returns:
        `DatasetDict` with `train` (16 scenes, ~150 KB) and `test` (4 scenes, ~25 KB) of one column `text`,
        one row per scene (the title line is prepended to the first scene). Fixed: scenes 3, 8, 13 and 18 (1-based)
        are the held-out ones.
    """
    import gzip
    import re

    import datasets

    with gzip.open(hamlet_path(), "rt", encoding="utf-8") as f:
        text = f.read()
    parts = re.split(r"\n(?=SCENE [IVX]+\.)", text)
    scenes = [parts[0] + "\n" + parts[1]] + parts[2:]
    held_out = [s for i, s in enumerate(scenes) if i % _HAMLET_HELD_OUT_EVERY == 2]
    train = [s for i, s in enumerate(scenes) if i % _HAMLET_HELD_OUT_EVERY != 2]
    return datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": train}), "test": datasets.Dataset.from_dict({"text": held_out})}
    )
