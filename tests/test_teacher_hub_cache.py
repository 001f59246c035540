"""Teacher logits on the Hub: `hf-compress cache-teacher` pushes a teacher cache as a dataset repo to the test Hub
(tests/hub_server.py), and `DistillationTrainer(teacher_logits=...)` trains on it with no teacher loaded, exactly as
with the local cache; a cache made for another run is refused in one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import HUB_TOKEN, VOCAB, random_classification_dataset, random_lm_dataset, tiny_bert_config, tiny_llama_config
from lm_helpers import tiny_tokenizer

from hf_compress.distillation import DistillationArguments, layer_dropped_student
from hf_compress.distillation import hub_cache
from hf_compress.distillation.cache import teacher_fingerprint
from hf_compress.trainers import DistillationTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_K, T, BATCH = 8, 2.0, 8


def randomise_norms_and_biases(model, seed: int = 0):
    """Norm weights in [0.5, 1.5] and biases ~ N(0, 0.1), so a formula that ignores them cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 if name.endswith("bias") else torch.rand(p.shape, generator=g) + 0.5)
    return model


def make_setup(tmp_path, kind: str):
    """A saved 3-layer teacher with its tokenizer, and the tokenized training set saved with `save_to_disk`."""
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        teacher, ds = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3)), random_lm_dataset(16, 12)
    else:
        teacher = BertForSequenceClassification(tiny_bert_config(num_hidden_layers=3, num_labels=3))
        ds = random_classification_dataset(16, 12, num_labels=3)
    randomise_norms_and_biases(teacher)
    tdir, ddir = tmp_path / f"{kind}-teacher", tmp_path / f"{kind}-data"
    teacher.save_pretrained(tdir)
    tiny_tokenizer().save_pretrained(tdir)
    ds.save_to_disk(str(ddir))
    return str(tdir), str(ddir)


def train_args(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=BATCH,
                learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, logging_steps=1, seed=0,
                disable_tqdm=True, temperature=T, alpha=0.7)
    base.update(kw)
    return DistillationArguments(**base)


def run(trainer):
    trainer.train()
    losses = [(h["loss"], h["soft_loss"]) for h in trainer.state.log_history if "loss" in h]
    return losses, {k: v.clone() for k, v in trainer.model.state_dict().items()}


def cli_push(hub, tmp_path, tdir, ddir, repo, *extra):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_TOKEN=HUB_TOKEN, PYTHONPATH=ROOT,
               HF_HUB_CACHE=str(tmp_path / "push-cache"))
    cmd = [sys.executable, "-m", "hf_compress.cli.main", "cache-teacher", "--teacher", tdir, "--dataset", ddir,
           "--hub_repo", repo, "--top_k", str(TOP_K), "--temperature", str(T), "--batch_size", str(BATCH), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_pushed_cache_trains_exactly_like_the_local_cache(kind, hub, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tdir, ddir = make_setup(tmp_path, kind)
    repo = f"acme/{kind}-logits"
    proc = cli_push(hub, tmp_path, tdir, ddir, repo, "--teacher_revision", "rev-a")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"Pushed the top-{TOP_K} logits of {tdir} on 16 rows to {repo} at commit" in proc.stdout
    commits = hub.commits(repo, repo_type="dataset")
    assert len(commits) == 2  # the repo's initial commit + exactly one for the push
    assert sorted(commits[-1]["files"]) == [".gitattributes", "README.md", "data/train-00000-of-00001.parquet"]

    auto = AutoModelForCausalLM if kind == "llama" else AutoModelForSequenceClassification
    tok = AutoTokenizer.from_pretrained(tdir)
    ds = datasets.load_from_disk(ddir)
    teacher = auto.from_pretrained(tdir)
    local = DistillationTrainer(
        model=layer_dropped_student(teacher, [0, 2]), teacher_model=teacher, processing_class=tok, train_dataset=ds,
        args=train_args(tmp_path, "local", cache_teacher_logits=True, teacher_logits_top_k=TOP_K),
    )
    student = layer_dropped_student(auto.from_pretrained(tdir), [0, 2])
    # Each run right after its trainer is built: `Trainer.__init__` seeds the dropout masks of the run.
    local_losses, local_weights = run(local)
    del teacher, local.teacher
    remote = DistillationTrainer(model=student, teacher_model=None, teacher_logits=repo, processing_class=tok,
                                 train_dataset=ds, args=train_args(tmp_path, "remote", teacher_revision="rev-a"))
    assert remote.teacher is None
    remote_losses, remote_weights = run(remote)
    # The downloaded cache is the local one, value for value.
    assert remote.teacher_cache.to_dict() == local.teacher_cache.to_dict()
    assert len(remote_losses) == 4 and remote_losses == local_losses
    assert all(soft > 0 for _, soft in remote_losses)  # the teacher part is there, not only the labels
    assert all(torch.equal(remote_weights[k], local_weights[k]) for k in local_weights)

    from huggingface_hub import hf_hub_download, metadata_load

    key = metadata_load(hf_hub_download(repo, "README.md", repo_type="dataset"))[hub_cache.KEY_FIELD]
    assert key["teacher_id"] == os.path.basename(tdir) and key["teacher_revision"] == "rev-a"
    assert key["teacher_digest"] == teacher_fingerprint(auto.from_pretrained(tdir))
    assert key["tokenizer_digest"] == hub_cache.tokenizer_digest(tok) and key["tokenizer_size"] == VOCAB
    assert (key["top_k"], key["temperature"], key["dtype"], key["num_rows"]) == (TOP_K, T, "float32", 16)
    assert key["dataset_digest"] == hub_cache.dataset_digest(ds) and key["dataset_fingerprint"] == ds._fingerprint
    if kind == "llama":
        assert (key["task"], key["width"], key["left_padding_positions"]) == ("causal-lm", VOCAB, False)
    else:  # BERT reads absolute positions: left-padded rows are read unpadded, by the cache as by the trainer
        assert (key["task"], key["width"], key["num_classes"], key["left_padding_positions"]) == (
            "sequence-classification", None, 3, True)


@pytest.fixture
def pushed(hub, tmp_path):
    """A Llama teacher's top-k cache pushed in this process (in three shards), with its teacher, data and tokenizer."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    teacher = randomise_norms_and_biases(LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3)))
    ds, tok = random_lm_dataset(16, 12), tiny_tokenizer()
    result, key = hub_cache.push_teacher_cache(teacher, ds, "acme/llama-logits", tok, top_k=TOP_K, temperature=T,
                                               batch_size=BATCH, teacher_revision="rev-a", shard_bytes=4000)
    return teacher, ds, tok, result, key


def test_shards_read_back_as_the_local_cache(pushed, tmp_path):
    from transformers import DataCollatorWithPadding

    from hf_compress.distillation.cache import compute_teacher_cache

    teacher, ds, tok, result, key = pushed
    cache, got = hub_cache.load_hub_teacher_cache("acme/llama-logits")
    assert got == key
    n = -(-cache.data.nbytes // 4000)  # shards of at most `shard_bytes` (before compression)
    assert n > 1 and [f for f in result.files if f.startswith("data/")] == [f"data/train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    local = compute_teacher_cache(teacher, ds, DataCollatorWithPadding(tok), "causal-lm", TOP_K, BATCH,
                                  str(tmp_path / "local.arrow"), T, "float32", VOCAB, columns=["input_ids", "attention_mask"])
    assert cache.to_dict() == local.to_dict()


def _other_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{f"t{i}": i for i in range(4, VOCAB)}}
    vocab["t4"], vocab["t5"] = 5, 4  # two tokens swapped: same size, other ids
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


HEX = "'[0-9a-f]{32}'"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"teacher_revision": "rev-b"}, r"The teacher logits acme/llama-logits have `teacher_revision` 'rev-a' but this "
         r"run has 'rev-b'; point `teacher_logits` at the cache of this revision, or push one with `--teacher_revision`"),
        ({"temperature": 1.0}, r"have `temperature` 2.0 but this run has 1.0; set `temperature` to the cache's, or push "
         r"a cache at this temperature \(`--temperature`\)"),
        ({"dataset": "other"}, rf"have `dataset_digest` {HEX} but this run has {HEX}; train on the exact tokenized set "
         r"the cache was computed on"),
        ({"dataset": "shorter"}, r"have `num_rows` 16 but this run has 12; train on the exact tokenized set"),
        ({"tokenizer": "other"}, r"were made with tokenizer None \(`tokenizer_digest` [0-9a-f]{32}\) but "
         r"`processing_class` has `tokenizer_digest` [0-9a-f]{32}; pass the teacher's tokenizer as `processing_class`"),
        ({"teacher_model": "acme/other-teacher"}, r"have `teacher_id` None but this run has 'acme/other-teacher'"),
        ({"student_vocab": 90}, r"^The student has input-embedding size 90 but the teacher of acme/llama-logits had 97 and "
         r"the tokenizer has 97 tokens; use a student with the teacher's tokenizer.$"),
    ],
)
def test_a_cache_for_another_run_is_refused_in_one_line(change, message, pushed, tmp_path):
    teacher, ds, tok, _, _ = pushed
    data = {"other": random_lm_dataset(16, 12, seed=1), "shorter": ds.select(range(12))}.get(change.get("dataset"), ds)
    tokenizer = _other_tokenizer() if change.get("tokenizer") else tok
    kw = {k: v for k, v in change.items() if k in ("teacher_revision", "temperature")}
    args = train_args(tmp_path, "run", teacher_logits="acme/llama-logits", **kw)
    student = layer_dropped_student(teacher, [0, 2])
    if "student_vocab" in change:
        from transformers import LlamaForCausalLM

        student = LlamaForCausalLM(tiny_llama_config(vocab_size=change["student_vocab"]))
    with pytest.raises(ValueError, match=message) as err:
        DistillationTrainer(model=student, teacher_model=change.get("teacher_model"),
                            args=args, train_dataset=data, processing_class=tokenizer)
    assert "\n" not in str(err.value)


def test_consumption_refuses_what_it_cannot_check(pushed, tmp_path):
    teacher, ds, tok, _, _ = pushed
    student = layer_dropped_student(teacher, [0, 2])
    args = train_args(tmp_path, "run", teacher_logits="acme/llama-logits")
    with pytest.raises(ValueError, match=r"replaces the teacher: pass `teacher_model=None`"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok)
    with pytest.raises(ValueError, match=r"needs `processing_class` \(the tokenizer the cache was made with\)"):
        DistillationTrainer(model=student, args=args, train_dataset=ds)
    with pytest.raises(ValueError, match=r"holds the training set's logits only, so evaluation has no teacher"):
        DistillationTrainer(model=student, args=train_args(tmp_path, "e", teacher_logits="acme/llama-logits", eval_strategy="steps"),
                            train_dataset=ds, eval_dataset=ds, processing_class=tok)
    with pytest.raises(ValueError, match=r"replaces the teacher and its cache; drop `cache_teacher_logits`"):
        train_args(tmp_path, "c", teacher_logits="acme/llama-logits", cache_teacher_logits=True)
    with pytest.raises(ValueError, match=r"is downloaded to the Hugging Face cache, not to teacher_cache_dir='d'"):
        train_args(tmp_path, "d", teacher_logits="acme/llama-logits", teacher_cache_dir="d")
    with pytest.raises(ValueError, match=r"teacher_revision='x' is checked against Hub teacher logits only"):
        DistillationTrainer(model=student, teacher_model=teacher, args=train_args(tmp_path, "r", teacher_revision="x"),
                            train_dataset=ds, processing_class=tok)
    with pytest.raises(ValueError, match=r"has no `hf_compress_teacher_cache` key in its README.md metadata"):
        os.makedirs(tmp_path / "not-a-cache")
        (tmp_path / "not-a-cache" / "README.md").write_text("# hello\n")
        DistillationTrainer(model=student, teacher_logits=str(tmp_path / "not-a-cache"), args=train_args(tmp_path, "n"),
                            train_dataset=ds, processing_class=tok)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"repo_id": "no-namespace"}, r"hub_repo must look like `namespace/name`, got 'no-namespace'"),
        ({"repo_id": ""}, r"hub_repo must be a dataset repo id `namespace/name`, got ''"),
        ({"top_k": 0}, r"top_k must be an integer >= 1 \(or None for full logits\), got 0"),
        ({"temperature": 0}, r"temperature must be a number > 0, got 0"),
        ({"dtype": "int8"}, r"dtype must be one of float32, float16, bfloat16, got 'int8'"),
        ({"dataset": "untokenized"}, r"dataset has no `input_ids` column \(columns: \['text'\]\); tokenize it first"),
    ],
)
def test_bad_push_input_is_refused_before_any_teacher_forward(kw, message, hub):
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    teacher = LlamaForCausalLM(tiny_llama_config())

    def forbidden(*a, **k):
        raise AssertionError("the teacher ran")

    teacher.forward = forbidden
    ds = Dataset.from_dict({"text": ["a b"]}) if kw.get("dataset") else random_lm_dataset(4, 6)
    args = {**dict(repo_id="acme/x", top_k=4, temperature=1.0, dtype="float32"), **{k: v for k, v in kw.items() if k != "dataset"}}
    with pytest.raises(ValueError, match=message):
        hub_cache.push_teacher_cache(teacher, ds, args.pop("repo_id"), tiny_tokenizer(), **args)
    assert not [r for r in hub.requests if r["method"] == "POST"]  # nothing reached the Hub


def test_cli_refuses_bad_input_in_one_line(capsys):
    from hf_compress.cli.main import main

    assert main(["cache-teacher", "--teacher", "t", "--dataset", "d"]) == 2
    err = capsys.readouterr().err
    assert err == ("hf-compress cache-teacher: error: --hub_repo is required, e.g. `hf-compress cache-teacher --teacher T "
                   "--dataset D --hub_repo me/teacher-logits`.\n")
    assert main(["cache-teacher", "--teacher", "t", "--dataset", "d", "--hub_repo", "me/x", "--top_k", "-1"]) == 2
    assert capsys.readouterr().err == "hf-compress cache-teacher: error: --top_k must be >= 1 (or 0 for full logits), got -1.\n"
    assert main(["cache-teacher", "--teacher", "t", "--dataset", "d", "--hub_repo", "me/x", "--temperature", "0"]) == 2
    assert "temperature must be a number > 0, got 0.0" in capsys.readouterr().err


@pytest.fixture
def pipeline_setup(tmp_path):
    """A tiny BERT classifier teacher (random norms and biases), its 1-layer student with the teacher's head and
    tokenizer, and the CSV both runs read."""
    from test_cli import make_csv, make_tiny_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tdir = make_tiny_model(tmp_path / "teacher", head=True)
    teacher = randomise_norms_and_biases(AutoModelForSequenceClassification.from_pretrained(tdir))
    teacher.save_pretrained(tdir)
    sdir = str(tmp_path / "student")
    layer_dropped_student(teacher, [1]).save_pretrained(sdir)
    AutoTokenizer.from_pretrained(tdir).save_pretrained(sdir)
    return tdir, sdir, make_csv(tmp_path / "data.csv", n=48)


PIPELINE = ["--no_prune", "--no_quantize", "--temperature", str(T), "--alpha", "0.5", "--max_steps", "4",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", str(BATCH), "--learning_rate",
            "1e-3", "--logging_steps", "1", "--max_length", "16", "--disable_tqdm", "true", "--use_cpu", "true"]


def _pipeline(main, sdir, data, out, *extra):
    from safetensors.torch import load_file

    assert main(["--model", sdir, "--dataset", data, "--output_dir", str(out), *PIPELINE, *extra]) == 0
    with open(os.path.join(out, "compression_report.json")) as f:
        report = json.load(f)
    losses = [(h["loss"], h["soft_loss"]) for h in report["pipeline"]["stages"]["train"]["log_history"] if "loss" in h]
    return report, losses, load_file(os.path.join(out, "model.safetensors"))


def test_hf_compress_distils_from_a_cache_pushed_for_its_data_exactly_like_the_live_teacher(pipeline_setup, hub, tmp_path, capsys):
    # `hf-compress cache-teacher` on the raw CSV (no tokenized set): the rows hf-compress trains on; then
    # `hf-compress --teacher_logits` trains on them with no teacher loaded, as the live teacher's local top-k cache.
    from hf_compress.cli.main import main

    tdir, sdir, data = pipeline_setup
    proc = cli_push(hub, tmp_path, tdir, data, "acme/cli-logits", "--max_length", "16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    live, live_losses, live_weights = _pipeline(main, sdir, data, tmp_path / "live", "--teacher", tdir,
                                                "--cache_teacher_logits", "true", "--teacher_logits_top_k", str(TOP_K))
    capsys.readouterr()
    hub_report, hub_losses, hub_weights = _pipeline(main, sdir, data, tmp_path / "hub", "--teacher", tdir,
                                                    "--teacher_logits", "acme/cli-logits")
    printed = capsys.readouterr().out
    assert "distil 4 steps from the Hub teacher logits acme/cli-logits (no teacher loaded)" in printed
    assert hub_report["techniques"] == live["techniques"] == ["distillation"]
    assert len(hub_losses) == 4 and hub_losses == live_losses and all(soft > 0 for _, soft in hub_losses)
    assert hub_weights.keys() == live_weights.keys()
    assert all(torch.equal(hub_weights[k], live_weights[k]) for k in live_weights)


def test_hf_compress_refuses_a_cache_of_other_rows_before_training(pipeline_setup, hub, tmp_path, capsys):
    from hf_compress.cli.main import main

    tdir, sdir, data = pipeline_setup
    proc = cli_push(hub, tmp_path, tdir, data, "acme/cli-logits", "--max_length", "16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    capsys.readouterr()
    out = tmp_path / "other"
    args = ["--model", sdir, "--dataset", data, "--output_dir", str(out), *PIPELINE, "--teacher_logits", "acme/cli-logits"]
    # another --seed holds out other rows: as many rows, others, so the cache's dataset digest differs
    assert main([*args, "--seed", "1"]) == 2
    # the check loads and tokenizes the rows (their progress bars are the only other output), then one line
    bar, _, err = capsys.readouterr().err.partition("hf-compress: error: ")
    bars = [line for line in bar.replace("\r", "\n").split("\n") if line]
    assert bars and all(re.fullmatch(r"[A-Za-z ]+: .*examples/s\]", line) for line in bars)
    err = "hf-compress: error: " + err
    assert err.startswith("hf-compress: error: --teacher_logits: The teacher logits acme/cli-logits have `dataset_digest` ")
    assert err.endswith("build the cache for these rows with `hf-compress cache-teacher --dataset <this --dataset> "
                        "<the same data options>`.\n") and err.count("\n") == 1
    assert not out.exists()
    assert main([*args, "--teacher", "base"]) == 2
    assert capsys.readouterr().err == (
        "hf-compress: error: --teacher_logits acme/cli-logits replaces the teacher, and `--teacher base` distils from "
        "this model itself; drop one (`--teacher <id>` with --teacher_logits only names the teacher the cache must "
        "come from).\n")
    assert main([*args, "--no_train"]) == 2
    assert capsys.readouterr().err == "hf-compress: error: --teacher_logits acme/cli-logits is read while training; drop --no_train.\n"


def test_sft_config_carries_the_field(tmp_path):
    pytest.importorskip("trl")
    from hf_compress.trainers import SFTDistillationConfig

    cfg = SFTDistillationConfig(str(tmp_path), teacher_logits="me/x@abc", teacher_revision="rev-a", report_to="none",
                                use_cpu=True, bf16=False)
    assert (cfg.teacher_logits, cfg.teacher_revision) == ("me/x@abc", "rev-a")
    assert hub_cache.split_repo_revision(cfg.teacher_logits) == ("me/x", "abc")


def test_a_failed_commit_leaves_no_repo_behind(hub, tmp_path):
    from transformers import LlamaForCausalLM

    from hf_compress.hub import HubPushError

    torch.manual_seed(0)
    folder = str(tmp_path / "cache")
    hub_cache.write_teacher_cache_folder(folder, LlamaForCausalLM(tiny_llama_config()), random_lm_dataset(4, 6),
                                         tiny_tokenizer(), top_k=4)
    hub.fail_with = {"commit": 500}
    with pytest.raises(HubPushError, match=r"^Push to http://127.0.0.1:\d+ failed: HTTP 500: the Hub failed while "
                       r"uploading; nothing was committed, retry the same call. The dataset repo acme/x that this push "
                       r"created was deleted again.$"):
        hub_cache.push_teacher_cache_folder(folder, "acme/x")
    assert not hub.dataset_store.exists("acme/x")
    hub.fail_with = {}
    result = hub_cache.push_teacher_cache_folder(folder, "acme/x")  # the same call, retried
    assert hub.commits("acme/x", repo_type="dataset")[-1]["id"] == result.commit_oid


def test_key_names_a_local_teacher_by_its_folder_never_by_its_path(tmp_path):
    from hf_compress.distillation.hub_cache import expected_key, public_name

    folder = tmp_path / "my-teacher"
    folder.mkdir()
    assert public_name(str(folder)) == "my-teacher"
    assert public_name("org/teacher") == "org/teacher"
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]]})
    assert expected_key(ds, None, "causal-lm", 1.0, teacher_id=str(folder))["teacher_id"] == "my-teacher"


def test_sft_trainer_trains_on_hub_teacher_logits_exactly_like_the_local_cache(hub, tmp_path):
    """`SFTDistillationTrainer(teacher_logits=...)`: TRL renders and tokenizes the chats, the key is checked against
    the rows TRL built, and the run equals the one with the live teacher's local top-k cache, step for step."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    from hf_compress.distillation.cache import ROW
    from hf_compress.trainers import SFTDistillationConfig, SFTDistillationTrainer

    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    g = torch.Generator().manual_seed(1)

    def words(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(f"t{int(i)}" for i in torch.randint(5, VOCAB, (n,), generator=g))

    chats = Dataset.from_dict({"messages": [[{"role": "user", "content": words(3, 8)},
                                              {"role": "assistant", "content": words(2, 7)}] for _ in range(12)]})
    torch.manual_seed(0)
    teacher = randomise_norms_and_biases(LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3)))

    def config(name, **kw):
        return SFTDistillationConfig(
            output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=BATCH,
            learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, logging_steps=1, seed=0,
            disable_tqdm=True, bf16=False, max_length=48, temperature=T, alpha=0.7, **kw)

    local = SFTDistillationTrainer(
        model=layer_dropped_student(teacher, [0, 2]), teacher_model=teacher, train_dataset=chats, processing_class=tok,
        args=config("local", cache_teacher_logits=True, teacher_logits_top_k=TOP_K, teacher_cache_dir=str(tmp_path / "c")),
    )
    # The rows TRL built (chat template applied, tokenized, truncated): what the teacher's cache is pushed for.
    rows = local.train_dataset.remove_columns([ROW])
    assert "input_ids" in rows.column_names and len(rows) == 12
    hub_cache.push_teacher_cache(teacher, rows, "acme/sft-logits", tok, top_k=TOP_K, temperature=T, batch_size=BATCH,
                                 teacher_revision="rev-a")
    student = layer_dropped_student(teacher, [0, 2])
    local_losses, local_weights = run(local)
    remote = SFTDistillationTrainer(model=student, teacher_model=None, teacher_logits="acme/sft-logits",
                                    train_dataset=chats, processing_class=tok, args=config("remote", teacher_revision="rev-a"))
    assert remote.teacher is None
    remote_losses, remote_weights = run(remote)
    assert remote.teacher_cache.to_dict() == local.teacher_cache.to_dict()
    assert len(remote_losses) == 3 and remote_losses == local_losses
    assert all(soft > 0 for _, soft in remote_losses)
    assert all(torch.equal(remote_weights[k], local_weights[k]) for k in local_weights)
    # Chats rendered otherwise (another template) are other rows: refused before any step.
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} </s> {% endfor %}"
    with pytest.raises(ValueError, match=r"have `dataset_digest` '[0-9a-f]{32}' but this run has '[0-9a-f]{32}'"):
        SFTDistillationTrainer(model=student, teacher_logits="acme/sft-logits", train_dataset=chats, processing_class=tok,
                               args=config("other", teacher_revision="rev-a"))
    # Packed rows are not the padded rows the cache holds: refused in one line, before TRL packs anything.
    with pytest.raises(ValueError, match=r"^teacher_logits='acme/sft-logits' with `packing=True` is not supported: .* "
                       r"set `packing=False`, or distil from the live teacher.$"):
        SFTDistillationTrainer(model=student, teacher_logits="acme/sft-logits", train_dataset=chats, processing_class=tok,
                               args=config("packed", packing=True))


def test_key_mismatch_names_its_field_for_the_fix_hint():
    # The pipeline picks its "rebuild the cache for these rows" hint from the field, not from the message's words.
    from hf_compress.distillation.hub_cache import ROW_FIELDS, CacheKeyMismatch, check_hub_cache_key

    with pytest.raises(CacheKeyMismatch) as err:
        check_hub_cache_key({"top_k": 8, "num_rows": 10, "temperature": 2.0}, {"num_rows": 10, "temperature": 1.0}, "u/c")
    assert err.value.field == "temperature" and err.value.field not in ROW_FIELDS
    assert str(err.value).startswith("The teacher logits u/c have `temperature` 2.0 but this run has 1.0; ")
    with pytest.raises(CacheKeyMismatch) as err:
        check_hub_cache_key({"top_k": 8, "num_rows": 10}, {"num_rows": 12}, "u/c")
    assert err.value.field == "num_rows" and isinstance(err.value, ValueError)


@pytest.mark.slow
def test_real_smollm2_hf_compress_distils_from_hub_logits_exactly_like_its_local_cache(hub, tmp_path, capsys):
    """The real SmolLM2-135M teacher and its half-depth student on Hamlet: `hf-compress cache-teacher` (a subprocess)
    pushes the top-k logits of the rows `hf-compress` trains on to the Hub server, and `hf-compress --teacher_logits`
    trains from them with no teacher loaded: the same logged losses and the same weights as the run that builds the
    live teacher's local top-k cache."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.lm_distillation import half_layers
    from hf_compress.cli.main import main
    from hf_compress.models import smollm2_path

    tdir = smollm2_path()
    teacher = AutoModelForCausalLM.from_pretrained(tdir, dtype=torch.float32)
    sdir = str(tmp_path / "student")
    layer_dropped_student(teacher, half_layers(teacher.config.num_hidden_layers)).save_pretrained(sdir)
    AutoTokenizer.from_pretrained(tdir).save_pretrained(sdir)
    del teacher
    data = ["--max_length", "32", "--max_train_samples", "8", "--seed", "0"]
    proc = cli_push(hub, tmp_path, tdir, "hamlet", "acme/smollm2-hamlet-logits", *data)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Pushed the top-8 logits of" in proc.stdout

    def run(out, *extra):
        args = ["--model", sdir, "--dataset", "hamlet", "--output_dir", str(out), "--no_prune", "--no_quantize",
                "--temperature", str(T), "--alpha", "0.5", "--max_steps", "2", "--per_device_train_batch_size", "4",
                "--learning_rate", "1e-4", "--logging_steps", "1", "--max_eval_samples", "1", "--disable_tqdm", "true",
                "--use_cpu", "true", *data, "--teacher", tdir, *extra]
        assert main(args) == 0
        with open(os.path.join(out, "compression_report.json")) as f:
            history = json.load(f)["pipeline"]["stages"]["train"]["log_history"]
        return ([(h["loss"], h["hard_loss"], h["soft_loss"]) for h in history if "hard_loss" in h],
                load_file(os.path.join(out, "model.safetensors")))

    local_losses, local_weights = run(tmp_path / "local", "--cache_teacher_logits", "true",
                                      "--teacher_logits_top_k", str(TOP_K))
    capsys.readouterr()
    hub_losses, hub_weights = run(tmp_path / "hub", "--teacher_logits", "acme/smollm2-hamlet-logits")
    assert "from the Hub teacher logits acme/smollm2-hamlet-logits (no teacher loaded)" in capsys.readouterr().out
    assert len(hub_losses) == 2 and hub_losses == local_losses and all(soft > 0 for _, _, soft in hub_losses)
    assert hub_weights.keys() == local_weights.keys()
    assert all(torch.equal(hub_weights[k], local_weights[k]) for k in local_weights)
