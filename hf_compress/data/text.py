"""Plain-text files as documents: one row per blank-line paragraph, never per line.

Prose is hard-wrapped (every book is): read line by line, each 12-token line would become a document of its own,
glued to the next with an end-of-text, so a causal LM would learn an end-of-text after every line and its
perplexity would be dominated by the boundaries. Here a document is a paragraph: the lines between blank lines
(a line of only spaces counts as blank), joined with their newlines as written.
"""

from __future__ import annotations

import os

TEXT_SUFFIX = ".txt"
# suffix -> fsspec's codec name
_CODECS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
COMPRESSIONS = tuple(_CODECS)
TEXT_COLUMN = "text"


def strip_compression(path: str) -> str:
    """`path` without a trailing compression suffix (`.gz`, `.bz2`, `.xz`, `.zst`)."""
    for comp in COMPRESSIONS:
        if path.endswith(comp):
            return path[: -len(comp)]
    return path


def is_text_file(path: str) -> bool:
    """Whether `path` names a plain-text file, optionally compressed (`.txt`, `.txt.gz`, ...)."""
    return os.path.splitext(strip_compression(path))[1].lower() == TEXT_SUFFIX


def paragraphs(lines) -> list[str]:
    """The blank-line-separated paragraphs of an iterable of lines, each with its inner newlines kept.

    Lines may end in `\\n` or `\\r\\n`; leading and trailing blank lines of a paragraph are dropped.
    """
    out, current = [], []
    for line in lines:
        line = line.rstrip("\r\n")
        if line.strip():
            current.append(line.rstrip())
        elif current:
            out.append("\n".join(current))
            current = []
    if current:
        out.append("\n".join(current))
    return out


def read_paragraphs(path: str) -> list[str]:
    """The paragraphs of one text file, decompressed by its suffix (fsspec; `.zst` needs `zstandard`)."""
    import fsspec
    from fsspec.compression import compr

    codec = next((c for suffix, c in _CODECS.items() if path.endswith(suffix)), None)
    if codec is not None and codec not in compr:  # else fsspec would hand back the compressed bytes as text
        raise ImportError(f"Reading {os.path.basename(path)!r} needs the `{codec}` codec: `pip install zstandard`.")
    with fsspec.open(path, mode="rt", encoding="utf-8", compression=codec) as f:
        return paragraphs(f)


def text_files_of_folder(folder: str) -> dict[str, list[str]] | None:
    """The text files of a folder by split, as `datasets` infers splits from names (`train.txt`, `test/part.txt`).

    Returns `None` when the folder holds no data file or any data file that is not text (then `datasets` reads it).
    """
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        files = DataFilesDict.from_patterns(get_data_patterns(folder), folder)
    except Exception:  # no data file datasets would recognise: leave the folder to `load_dataset`
        return None
    found = {str(split): [str(f) for f in fs] for split, fs in files.items() if len(fs)}
    if not found or not all(is_text_file(f) for fs in found.values() for f in fs):
        return None
    return found


def load_text_documents(files: dict[str, list[str]]):
    """A `DatasetDict` with one `text` row per paragraph of each split's files, in file order."""
    import datasets

    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict({TEXT_COLUMN: [p for f in paths for p in read_paragraphs(f)]})
        for split, paths in files.items()
    })


def describe_documents(files: dict[str, list[str]], root: str | None = None) -> str:
    """What a row is, for the plan: `documents: blank-line paragraphs of train.txt, test.txt`."""
    names = [os.path.relpath(f, root) if root else os.path.basename(f) for fs in files.values() for f in fs]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more files" if len(names) > 4 else "")
    return f"documents: blank-line paragraphs of {shown}"
