"""Reading the data and the model's config for [`prepare`]: shipped sets, local files of every supported kind, folders
and Hub ids, each failure one line; and the train / held-out split the whole run uses.
"""

from __future__ import annotations

import os

from ..tasks import CompressionInputError

_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_CONLL = (".conll", ".bio", ".iob")  # `word<TAB>tag` lines, a blank line between sentences


def load_config(model: str):
    """`AutoConfig` of a Hub id or directory, with a one-line error when it cannot be found."""
    from transformers import AutoConfig

    if os.path.exists(model) and not os.path.isdir(model):
        raise CompressionInputError(f"--model {model!r} is a file; pass the model's directory or a Hub id.")
    try:
        return AutoConfig.from_pretrained(model)
    except Exception as err:  # OSError (not found / offline), ValueError (no model_type), JSON errors
        where = "directory has no usable config.json" if os.path.isdir(model) else "is not a local directory and could not be fetched from the Hub"
        raise CompressionInputError(
            f"Unknown model {model!r}: it {where} ({type(err).__name__}); pass a model directory or a Hub id."
        ) from err


def load_dataset_any(name: str):
    """
    A `DatasetDict` from a shipped set (`rotten_tomatoes`, `hamlet`), a local file (`.csv`, `.tsv`, `.json`, `.jsonl`,
    `.parquet`, `.txt`, optionally `.gz`/`.bz2`/`.xz`/`.zst`-compressed; a `.json` in the official SQuAD layout is
    flattened; `.conll`/`.bio`/`.iob` give `tokens` and `tags` rows), a directory (`save_to_disk` output or data
    files, splits inferred from the names), or a Hub id. Text (a `.txt` file, or a folder of them such as
    `train.txt` / `test.txt`) gives one `text` row per blank-line paragraph, never one per line
    ([`~hf_compress.data.text.read_paragraphs`]); [`describe_documents`] says so in the plan.
    """
    import datasets

    from ..data import HAMLET, ROTTEN_TOMATOES, load_hamlet, load_rotten_tomatoes
    from ..data.text import is_text_file, load_text_documents, text_files_of_folder

    try:
        if name == ROTTEN_TOMATOES:
            return load_rotten_tomatoes()
        if name == HAMLET:
            return load_hamlet()
        if os.path.isfile(name):
            base = name
            for comp in _COMPRESSIONS:
                base = base[: -len(comp)] if base.endswith(comp) else base
            ext = os.path.splitext(base)[1].lower()
            if ext not in _FILE_BUILDERS and ext not in _CONLL:
                raise CompressionInputError(
                    f"Cannot read dataset file {name!r}: use .csv, .tsv, .json, .jsonl, .parquet, .txt (optionally "
                    ".gz/.bz2/.xz/.zst) or .conll, a save_to_disk folder or a Hub id."
                )
            rows = None
            if is_text_file(name):
                return load_text_documents({"train": [name]})
            if ext in _CONLL:
                from ..tasks.token_classification import read_conll

                rows = read_conll(name)  # rows of `tokens` and `tags`
            elif ext == ".json":
                from ..tasks.question_answering import read_squad_json

                rows = read_squad_json(name)
            if rows is not None:
                ds = datasets.Dataset.from_dict(rows)
            else:
                kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
                ds = datasets.load_dataset(_FILE_BUILDERS[ext], data_files=name, **kwargs)
        elif os.path.isdir(name):
            marker = any(os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "dataset_info.json", "state.json"))
            text_files = None if marker else text_files_of_folder(name)
            if text_files is not None:
                return load_text_documents(text_files)
            ds = datasets.load_from_disk(name) if marker else datasets.load_dataset(name)
        else:
            ds = datasets.load_dataset(name)
    except CompressionInputError:
        raise
    except ImportError as err:  # a codec or reader that is not installed: its own message names the package
        raise CompressionInputError(f"Cannot read dataset {name!r}: {err}") from err
    except Exception as err:
        raise CompressionInputError(
            f"Unknown dataset {name!r}: {type(err).__name__} while loading it; pass `rotten_tomatoes`, `hamlet`, a local "
            "csv/tsv/json/jsonl/parquet/txt file or directory, or a Hub dataset id."
        ) from err
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    return ds


def describe_documents(name: str) -> str | None:
    """What one row of the dataset `name` is, when the reader decided it (text files); `None` otherwise."""
    from ..data import HAMLET
    from ..data.text import describe_documents as describe_text, is_text_file, text_files_of_folder

    if name == HAMLET:
        return "documents: whole scenes of Hamlet"
    if os.path.isfile(name) and is_text_file(name):
        return describe_text({"train": [name]})
    if os.path.isdir(name) and not any(
        os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "dataset_info.json", "state.json")
    ):
        files = text_files_of_folder(name)
        if files is not None:
            return describe_text(files, root=name)
    return None


def load_splits(data_args, seed: int) -> tuple[object, object, str]:
    """
    The training rows, the held-out rows and the held-out split's name (as the plan and the report show it):
    `--eval_split`, else `test`, else `validation`, else a seeded 10% of `train`; then the seeded training subset of
    `--max_train_samples` and the first `--max_eval_samples` held-out rows.

    Raises:
        `CompressionInputError`: a missing split, too few rows or an empty split, with the fix.
    """
    dsd = load_dataset_any(data_args.dataset)
    if "train" not in dsd:
        raise CompressionInputError(
            f"Dataset {data_args.dataset!r} has no `train` split (splits: {', '.join(dsd)}); add one."
        )
    train = dsd["train"]
    if data_args.eval_split is not None:
        if data_args.eval_split not in dsd:
            raise CompressionInputError(
                f"Dataset {data_args.dataset!r} has no split {data_args.eval_split!r} (splits: {', '.join(dsd)}); fix `--eval_split`."
            )
        split_name, evaluation = data_args.eval_split, dsd[data_args.eval_split]
    elif "test" in dsd or "validation" in dsd:
        split_name = "test" if "test" in dsd else "validation"
        evaluation = dsd[split_name]
    else:
        if len(train) < 10:
            raise CompressionInputError(f"Dataset {data_args.dataset!r} has {len(train)} rows; pass at least 10 to hold some out.")
        parts = train.train_test_split(test_size=0.1, seed=seed)
        train, evaluation, split_name = parts["train"], parts["test"], "train (seeded 10% held out)"
    if len(train) == 0 or len(evaluation) == 0:
        raise CompressionInputError(f"Dataset {data_args.dataset!r} has an empty train or held-out split; add rows.")
    if data_args.max_train_samples is not None and data_args.max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(data_args.max_train_samples))
    if data_args.max_eval_samples is not None and data_args.max_eval_samples < len(evaluation):
        evaluation = evaluation.select(range(data_args.max_eval_samples))
        split_name = f"{split_name}[:{data_args.max_eval_samples}]"
    return train, evaluation, split_name
