"""Plain text as documents: a `.txt` file or a folder of them gives one row per blank-line paragraph (never per
line), compressed or not; the causal-LM stream joins paragraphs with one end-of-text between them; the plan says
what a document is."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os

import pytest

from hf_compress.data.text import paragraphs
from hf_compress.pipeline import DataArguments, describe_documents, load_dataset_any
from hf_compress.tasks.causal_lm import CausalLMTask
from task_helpers import WORDS

OPENERS = {"": open, ".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def hard_wrapped(n: int, seed: int, width: int = 4) -> list[str]:
    """`n` paragraphs of 3 to 5 hard-wrapped lines of `width` words each (a book's layout)."""
    import random

    rng = random.Random(seed)
    return ["\n".join(" ".join(rng.choice(WORDS[:14]) for _ in range(width)) for _ in range(rng.randint(3, 5)))
            for _ in range(n)]


def write_text(path, paras: list[str], comp: str = "", crlf: bool = False) -> str:
    # Paragraphs apart by a blank line, one of them a line of spaces; leading and trailing blank lines.
    seps = ["\n\n", "\n   \n", "\n\n\n"]
    body = "\n" + "".join(p + seps[i % 3] for i, p in enumerate(paras))
    if crlf:
        body = body.replace("\n", "\r\n")
    path = str(path) + comp
    with OPENERS[comp](path, "wt", encoding="utf-8", newline="") as f:
        f.write(body)
    return path


@pytest.mark.parametrize("comp", ["", ".gz", ".bz2", ".xz"])
def test_a_folder_of_hard_wrapped_train_and_test_text_gives_one_row_per_paragraph(comp, tmp_path):
    train, test = hard_wrapped(7, seed=0), hard_wrapped(3, seed=1)
    lines = sum(p.count("\n") + 1 for p in train)
    write_text(tmp_path / "train.txt", train, comp)
    write_text(tmp_path / "test.txt", test, comp, crlf=True)
    ds = load_dataset_any(str(tmp_path))
    assert sorted(ds) == ["test", "train"]
    assert ds["train"].num_rows == 7 and lines > 7  # paragraphs, not the lines
    assert ds["train"]["text"] == train  # each row is a paragraph with its own newlines, in file order
    assert ds["test"]["text"] == test
    assert describe_documents(str(tmp_path)) == f"documents: blank-line paragraphs of train.txt{comp}, test.txt{comp}"


def test_a_single_text_file_gives_paragraphs_and_says_so(tmp_path):
    paras = hard_wrapped(5, seed=2)
    path = write_text(tmp_path / "book.txt", paras, ".gz")
    ds = load_dataset_any(path)
    assert list(ds) == ["train"] and ds["train"]["text"] == paras
    assert describe_documents(path) == "documents: blank-line paragraphs of book.txt.gz"


def test_a_folder_with_split_subfolders_reads_every_file_by_paragraph(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    a, b, c = hard_wrapped(2, seed=3), hard_wrapped(3, seed=4), hard_wrapped(2, seed=5)
    write_text(tmp_path / "train" / "a.txt", a)
    write_text(tmp_path / "train" / "b.txt", b)
    write_text(tmp_path / "test" / "c.txt", c)
    ds = load_dataset_any(str(tmp_path))
    assert ds["train"]["text"] == a + b and ds["test"]["text"] == c
    assert describe_documents(str(tmp_path)) == (
        f"documents: blank-line paragraphs of {os.path.join('train', 'a.txt')}, {os.path.join('train', 'b.txt')}, "
        f"{os.path.join('test', 'c.txt')}"
    )


def test_paragraphs_split_only_at_blank_lines():
    assert paragraphs(["a b\n", "c\r\n", "  \n", "\n", "d\n", "e"]) == ["a b\nc", "d\ne"]
    assert paragraphs(["\n", " \n"]) == []


def test_a_folder_of_csv_is_still_read_by_datasets(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood,1\nbad,0\n")
    ds = load_dataset_any(str(tmp_path))
    assert ds["train"]["text"] == ["good", "bad"] and describe_documents(str(tmp_path)) is None


def test_causal_lm_stream_has_one_end_of_text_per_paragraph_and_none_inside(tmp_path):
    from task_helpers import make_tiny
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny(tmp_path / "m", "causal"))
    eos = tok.eos_token_id
    paras = hard_wrapped(6, seed=6)
    (tmp_path / "data").mkdir()
    write_text(tmp_path / "data" / "train.txt", paras)
    write_text(tmp_path / "data" / "test.txt", paras[:2])
    ds = load_dataset_any(str(tmp_path / "data"))
    task = CausalLMTask(DataArguments(dataset=str(tmp_path / "data"), max_length=16), str(tmp_path / "data"))
    train, _ = task.resolve(ds["train"], ds["test"], "test")
    blocks = task.preprocess(train, task.prepare_tokenizer(tok), train=True)
    stream = [t for b in blocks["input_ids"] for t in b]
    assert all(len(b) == 16 for b in blocks["input_ids"][:-1])  # blocks are cut from the stream, not per paragraph
    expected = [t for p in paras for t in tok(p)["input_ids"]]
    assert stream == expected and tok(paras[0])["input_ids"][-1] == eos
    # One end-of-text per paragraph, at its end: none after a hard-wrapped line inside it.
    assert stream.count(eos) == len(paras)
    ends = [i for i, t in enumerate(stream) if t == eos]
    lengths = [len(tok(p)["input_ids"]) for p in paras]
    assert ends == [sum(lengths[: i + 1]) - 1 for i in range(len(paras))]
    assert sum(p.count("\n") for p in paras) > len(paras)  # there were line breaks to be wrong about


def test_the_printed_plan_says_what_a_document_is(tmp_path, capsys):
    from hf_compress.cli.main import main
    from task_helpers import make_tiny

    model = make_tiny(tmp_path / "m", "causal")
    (tmp_path / "data").mkdir()
    write_text(tmp_path / "data" / "train.txt", hard_wrapped(12, seed=7))
    write_text(tmp_path / "data" / "test.txt", hard_wrapped(4, seed=8))
    assert main(["--model", model, "--dataset", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
                 "--no_train", "--no_prune", "--no_quantize", "--no_evaluate", "--max_length", "16", "--use_cpu", "true",
                 "--disable_tqdm", "true"]) == 0
    printed = capsys.readouterr()
    plan = next(line for line in (printed.out + printed.err).splitlines() if "Data notes" in line)
    assert "documents: blank-line paragraphs of train.txt, test.txt; train: blocks" in plan
    assert "train 12 rows" in (printed.out + printed.err)


def test_zstd_text_without_its_codec_is_one_line(tmp_path, monkeypatch):
    from fsspec.compression import compr

    from hf_compress.tasks.base import CompressionInputError

    monkeypatch.delitem(compr, "zstd", raising=False)  # as on a machine without `zstandard`
    path = tmp_path / "book.txt.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd not text")
    with pytest.raises(CompressionInputError, match=r"Cannot read dataset .*book.txt.zst.*: Reading 'book.txt.zst' "
                                                    r"needs the `zstd` codec: `pip install zstandard`\."):
        load_dataset_any(str(path))
