"""The bad-input table: every wrong argument is answered by one clear line, raised before any work starts.

Each row is (what is built, the error class, the pinned message).
"""

from __future__ import annotations

import json
import os

from types import SimpleNamespace

import pytest
import torch
from conftest import random_classification_dataset, tiny_bert_config, tiny_llama_config
from datasets import Dataset

from hf_compress.distillation import DistillationArguments
from hf_compress.distributed import check_distributed_support, check_safetensors_file, validate_checkpoint
from hf_compress.pruning import PruningArguments
from hf_compress.quantization import QuantizationArguments


def _dargs(**kw):
    return DistillationArguments(output_dir="unused", report_to="none", use_cpu=True, **kw)


# (builder, error class, message pinned with re.search)
ARGUMENT_TABLE = [
    # DistillationArguments
    pytest.param(lambda: _dargs(temperature=0.0), ValueError, r"^temperature must be > 0, got 0\.0\.$", id="temperature=0"),
    pytest.param(lambda: _dargs(temperature=-2), ValueError, r"^temperature must be > 0, got -2\.$", id="temperature<0"),
    pytest.param(lambda: _dargs(alpha=1.5), ValueError, r"^alpha must be in \[0, 1\], got 1\.5\.$", id="alpha>1"),
    pytest.param(lambda: _dargs(alpha=-0.1), ValueError, r"^alpha must be in \[0, 1\], got -0\.1\.$", id="alpha<0"),
    pytest.param(lambda: _dargs(teacher_logits_top_k=0, cache_teacher_logits=True), ValueError,
                 r"^teacher_logits_top_k must be >= 1, got 0\.$", id="top_k=0"),
    pytest.param(lambda: _dargs(teacher_logits_top_k=5), ValueError,
                 r"only applies to cached logits; set `cache_teacher_logits=True`", id="top_k-without-cache"),
    pytest.param(lambda: _dargs(teacher_dtype="int8"), ValueError,
                 r"^teacher_dtype must be one of float32, bfloat16, float16, got 'int8'\.$", id="teacher_dtype"),
    pytest.param(lambda: _dargs(distillation_task="summarization"), ValueError,
                 r"^distillation_task must be one of auto, .*got 'summarization'\.$", id="distillation_task"),
    pytest.param(lambda: _dargs(temperature="2"), TypeError, r"^temperature must be a number, got '2'",
                 id="temperature-str"),
    pytest.param(lambda: _dargs(alpha=None), TypeError, r"^alpha must be a number, got None",
                 id="alpha-None"),
    # PruningArguments (GradualPruningCallback validates through it)
    pytest.param(lambda: PruningArguments(target_sparsity=1.0), ValueError,
                 r"^target_sparsity must be in \[0, 1\), got 1\.0\.$", id="target_sparsity=1"),
    pytest.param(lambda: PruningArguments(target_sparsity=-0.1), ValueError,
                 r"^target_sparsity must be in \[0, 1\), got -0\.1\.$", id="target_sparsity<0"),
    pytest.param(lambda: PruningArguments(target_sparsity=0.5, pruning_initial_sparsity=0.6), ValueError,
                 r"^pruning_initial_sparsity must be in \[0, target_sparsity=0\.5\], got 0\.6\.$", id="initial>target"),
    pytest.param(lambda: PruningArguments(pruning_start_step=-1), ValueError,
                 r"^pruning_start_step must be >= 0, got -1\.$", id="start_step<0"),
    pytest.param(lambda: PruningArguments(pruning_start_step=5, pruning_end_step=5), ValueError,
                 r"^pruning_end_step must be > pruning_start_step=5, got 5\.$", id="end<=start"),
    pytest.param(lambda: PruningArguments(pruning_end_fraction=0.0), ValueError,
                 r"^pruning_end_fraction must be in \(0, 1\], got 0\.0\.$", id="end_fraction=0"),
    pytest.param(lambda: PruningArguments(pruning_end_fraction=1.5), ValueError,
                 r"^pruning_end_fraction must be in \(0, 1\], got 1\.5\.$", id="end_fraction>1"),
    pytest.param(lambda: PruningArguments(pruning_frequency=0), ValueError,
                 r"^pruning_frequency must be >= 1 optimizer step, got 0\.$", id="frequency=0"),
    pytest.param(lambda: PruningArguments(pruning_scope="row"), ValueError,
                 r"^pruning_scope must be 'layer' or 'global', got 'row'\.$", id="scope"),
    pytest.param(lambda: PruningArguments(target_sparsity=0.5, pruning_pattern="4:2"), ValueError,
                 r"pattern must be 'N:M' with 0 < N < M \(e\.g\. '2:4'\), got '4:2'\.", id="pattern-4:2"),
    pytest.param(lambda: PruningArguments(target_sparsity=0.3, pruning_pattern="2:4"), ValueError,
                 r"fixes the sparsity at 0\.5, but target_sparsity is 0\.3; set target_sparsity=0\.5", id="pattern-vs-target"),
    pytest.param(lambda: PruningArguments(target_sparsity="0.5"), TypeError, r"^target_sparsity must be a number, got '0\.5'",
                 id="target_sparsity-str"),
    pytest.param(lambda: PruningArguments(pruning_frequency=2.5), TypeError,
                 r"^pruning_frequency must be an integer, got 2\.5", id="frequency-float"),
    # QuantizationArguments
    pytest.param(lambda: QuantizationArguments(bits=3), ValueError, r"^bits must be 4 or 8, got 3; use 8 for LLM\.int8", id="bits=3"),
    pytest.param(lambda: QuantizationArguments(bits="8"), ValueError, r"^bits must be 4 or 8, got '8'", id="bits-str"),
    pytest.param(lambda: QuantizationArguments(bits=4, quant_type="int4"), ValueError,
                 r"^quant_type must be one of nf4, fp4, got 'int4'\.$", id="quant_type"),
    pytest.param(lambda: QuantizationArguments(bits=8, double_quant=True), ValueError,
                 r"^double_quant only applies to 4-bit, got bits=8; set `bits=4` or drop it\.$", id="double_quant-8bit"),
    pytest.param(lambda: QuantizationArguments(llm_int8_threshold=-1.0), ValueError,
                 r"^llm_int8_threshold must be >= 0, got -1\.0\.$", id="int8_threshold<0"),
    pytest.param(lambda: QuantizationArguments(qat_fraction=0.0), ValueError,
                 r"^qat_fraction must be in \(0, 1\], got 0\.0\.$", id="qat_fraction=0"),
    pytest.param(lambda: QuantizationArguments(qat_fraction="0.5"), TypeError,
                 r"^qat_fraction must be a number, got '0\.5' \(str\)\.$", id="qat_fraction-str"),
    pytest.param(lambda: QuantizationArguments(llm_int8_threshold=None), TypeError,
                 r"^llm_int8_threshold must be a number, got None \(NoneType\)\.$", id="int8_threshold-None"),
]


@pytest.mark.parametrize("build, error, message", ARGUMENT_TABLE)
def test_bad_argument_is_one_clear_line(build, error, message):
    with pytest.raises(error, match=message) as info:
        build()
    assert len(str(info.value).splitlines()) == 1


# ---- the trainer and its teacher -------------------------------------------------------------------------------


def _student():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config())


def _trainer(tmp_path, teacher, args=None, **kw):
    from hf_compress.trainers import DistillationTrainer

    if args is None:
        args = _dargs(max_steps=1, per_device_train_batch_size=4, save_strategy="no")
    args.output_dir = str(tmp_path / "out")
    return DistillationTrainer(model=kw.pop("model", None) or _student(), teacher_model=teacher, args=args, **kw)


def _bert(**kw):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(tiny_bert_config(**kw))


def _llama(**kw):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config(**kw))


TRAINER_TABLE = [
    pytest.param(lambda p: _trainer(p, _bert(num_labels=3)), ValueError,
                 r"^The student has num_labels 2 but the teacher has 3; use a teacher trained on the same labels\.$",
                 id="teacher-num_labels"),
    pytest.param(lambda p: _trainer(p, _llama(vocab_size=50), model=_llama()), ValueError,
                 r"^The student has vocab_size 97 but the teacher has 50; use a teacher with the same tokenizer \(if one "
                 r"embedding is only padded, pass the tokenizer as `processing_class` so the shared vocabulary can be "
                 r"checked\)\.$",
                 id="teacher-vocab"),
    pytest.param(lambda p: _trainer(p, _bert(id2label={0: "neg", 1: "pos"}),
                                    model=_bert(id2label={0: "pos", 1: "neg"})), ValueError,
                 r"^The student's labels .* differ from the teacher's .*; align `id2label` before distilling\.$",
                 id="teacher-id2label"),
    pytest.param(lambda p: _trainer(p, 123), TypeError,
                 r"^teacher_model must be a PreTrainedModel or a path, got int\.$", id="teacher-int"),
    pytest.param(lambda p: _trainer(p, str(p / "no-such-teacher")), ValueError,
                 r"^Cannot load the teacher '.*no-such-teacher': .*; pass a local model directory or a Hub id\.$",
                 id="teacher-missing-path"),
    pytest.param(lambda p: _trainer(p, None), ValueError,
                 r"^DistillationTrainer needs a `teacher_model`", id="teacher-None"),
    pytest.param(lambda p: _trainer(p, _bert(), args=__import__("transformers").TrainingArguments("x", use_cpu=True)),
                 TypeError, r"^DistillationTrainer needs `DistillationArguments`, got `TrainingArguments`", id="plain-args"),
    pytest.param(
        lambda p: _trainer(p, _bert(), train_dataset=Dataset.from_dict({"text": ["a b", "c"] * 4, "label": [0, 1] * 4})),
        ValueError, r"train_dataset has no `input_ids`.*tokenize", id="untokenized-dataset",
    ),
]


@pytest.mark.parametrize("build, error, message", TRAINER_TABLE)
def test_bad_trainer_input_is_one_clear_line(build, error, message, tmp_path):
    with pytest.raises(error, match=message) as info:
        build(tmp_path)
    assert len(str(info.value).splitlines()) == 1
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")  # nothing written


def test_dataset_without_labels_trains_on_soft_loss(tmp_path):
    data = random_classification_dataset(n=8).remove_columns(["labels"])
    trainer = _trainer(tmp_path, _bert(), train_dataset=data)
    trainer.args.save_strategy = "no"
    out = trainer.train()
    assert out.global_step == 1 and "hard_loss" not in trainer.state.log_history[-1]


def test_pruning_end_step_beyond_training_fails_before_the_first_step(tmp_path):
    from transformers import TrainerCallback

    from hf_compress.callbacks import GradualPruningCallback

    steps = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    trainer = _trainer(tmp_path, _bert(), train_dataset=random_classification_dataset(n=16),
                       callbacks=[GradualPruningCallback(end_step=5), Count()])
    with pytest.raises(ValueError, match=r"^pruning_end_step 5 is beyond max_steps 1, so target_sparsity would never be reached"):
        trainer.train()
    assert steps == []


# ---- distributed start-up checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, kwargs, callback, message",
    [
        # On CPU transformers trains `fsdp` as DDP: refused before the callbacks are looked at (tests/test_fsdp2.py
        # covers the FSDP2 rules themselves).
        ({}, {"fsdp": True}, "GradualPruningCallback", r"^`use_cpu=True` with `fsdp` trains with DDP, not FSDP"),
        ({"ACCELERATE_USE_FSDP": "true"}, {}, "QuantizationCallback",
         r"^`use_cpu=True` with `fsdp` trains with DDP, not FSDP"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, {}, "QATCallback",
         r"^`QATCallback` cannot run under DeepSpeed ZeRO-3: fake quantization needs the row-wise"),
    ],
    ids=["fsdp-args-pruning", "accelerate-fsdp-quantization", "zero3-qat"],
)
def test_sharded_training_refuses_whole_weight_callbacks(env, kwargs, callback, message, monkeypatch):
    import hf_compress.callbacks as callbacks
    from transformers import TrainingArguments

    args = TrainingArguments("unused", use_cpu=True, report_to="none", **kwargs)
    for key, value in env.items():  # what `accelerate launch` sets from its config file
        monkeypatch.setenv(key, value)
    cls = getattr(callbacks, callback)
    with pytest.raises(ValueError, match=message) as info:
        check_distributed_support(args, [cls])
    assert "train with DDP" in str(info.value) and len(str(info.value).splitlines()) == 1

    class Subclass(cls):  # a user's subclass is refused too
        pass

    with pytest.raises(ValueError, match=message):
        check_distributed_support(args, [Subclass])


def test_ddp_and_zero2_are_accepted(monkeypatch):
    from transformers import TrainingArguments

    from hf_compress.callbacks import GradualPruningCallback

    args = TrainingArguments("unused", use_cpu=True, report_to="none")
    assert check_distributed_support(args, [GradualPruningCallback()]) == "single"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert check_distributed_support(None, [GradualPruningCallback()]) == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert check_distributed_support(None, [GradualPruningCallback()]) == "deepspeed"


def test_ranks_the_trainer_would_not_synchronise_are_refused_in_one_line(monkeypatch):
    # `torchrun` on a machine without a GPU and without `use_cpu=True`: accelerate counts the ranks (with
    # `ddp_backend="gloo"`) but sets up no distributed training (parallel mode `not_parallel`), or counts 1 (without it).
    from transformers.training_args import ParallelMode

    from hf_compress.distributed import check_process_count

    monkeypatch.setenv("WORLD_SIZE", "2")
    for counted, mode, found in ((2, ParallelMode.NOT_PARALLEL, "counts 2 process(es) in parallel mode `not_parallel`"),
                                 (1, None, "counts 1 process(es)")):
        args = SimpleNamespace(fsdp=None, deepspeed=None, world_size=counted, parallel_mode=mode)
        with pytest.raises(ValueError) as err:
            check_distributed_support(args, [])
        assert str(err.value) == (
            f"The launcher started WORLD_SIZE=2 ranks but accelerate {found}: without a GPU and without `use_cpu=True` "
            "it sets up no distributed training, so every rank would train alone, unsynchronised, and write the same "
            "files; set `use_cpu=True` (`--use_cpu`; DDP over gloo) or launch on GPUs.")
    # `use_cpu=True` (or a GPU): the ranks are one distributed run
    check_process_count(SimpleNamespace(world_size=2, parallel_mode=ParallelMode.DISTRIBUTED), "ddp")


# ---- corrupt or missing checkpoint files ----------------------------------------------------------------------


def _fake_checkpoint(path):
    """A `checkpoint-N` folder as Trainer writes it (weights, config, trainer state), without training."""
    from transformers import TrainerState

    _student().save_pretrained(path)
    TrainerState(global_step=2, max_steps=4).save_to_json(os.path.join(path, "trainer_state.json"))
    return path


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_missing_checkpoint_is_one_line(tmp_path):
    trainer = _trainer(tmp_path, _bert(), train_dataset=random_classification_dataset(n=16))
    with pytest.raises(ValueError, match=r"^Checkpoint .*checkpoint-3 does not exist; pass an existing `checkpoint-N` folder"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_truncated_checkpoint_is_named_before_loading(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "checkpoint-2")
    _truncate(ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"checkpoint-2/model\.safetensors is truncated or corrupt \(.*\); delete that"):
        validate_checkpoint(str(ckpt))
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt \(\d+ bytes on disk, header says \d+\)"):
        check_safetensors_file(str(ckpt / "model.safetensors"))
    (ckpt / "trainer_state.json").write_text("{not json")
    _student().save_pretrained(ckpt)  # whole weights again: now the JSON is the broken file
    with pytest.raises(ValueError, match=r"trainer_state\.json is not valid JSON"):
        validate_checkpoint(str(ckpt))


def test_trainer_resume_from_truncated_checkpoint_names_the_file(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "checkpoint-2")
    _truncate(ckpt / "model.safetensors")
    trainer = _trainer(tmp_path, _bert(), train_dataset=random_classification_dataset(n=16))
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
        trainer.train(resume_from_checkpoint=str(ckpt))


def test_compressed_checkpoint_missing_is_one_line(tmp_path):
    from hf_compress.pruning import load_compressed

    with pytest.raises(FileNotFoundError, match=r"^No bitmask checkpoint in .*; write one with `save_compressed"):
        load_compressed(str(tmp_path / "nothing"))


def test_compressed_checkpoint_truncated_is_one_line(tmp_path):
    from hf_compress.pruning import load_compressed, save_compressed

    save_compressed(_student(), str(tmp_path / "c"))
    _truncate(tmp_path / "c" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
        load_compressed(str(tmp_path / "c"))


# ---- the Hub -----------------------------------------------------------------------------------------------


def test_unreachable_hub_endpoint_is_one_line_and_keeps_the_token_out(tmp_path, monkeypatch):
    import socket

    from huggingface_hub import constants

    from hf_compress.hub import push_to_hub
    from hf_compress.hub.push import HubPushError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets offline mode for everything else
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path / "ckpt"
    _student().save_pretrained(folder)
    before = sorted(os.listdir(folder))
    token = "hf_secret_token_123"
    with pytest.raises(HubPushError, match=rf"^Push to http://127\.0\.0\.1:{port} failed: cannot reach http://127\.0\.0\.1:{port} \(\w+\); check the server is up") as info:
        push_to_hub(str(folder), "me/tiny", endpoint=f"http://127.0.0.1:{port}", token=token)
    assert token not in str(info.value) and len(str(info.value).splitlines()) == 1
    assert sorted(os.listdir(folder)) == before  # the local output is whole


def test_bad_repo_id_is_one_line(tmp_path):
    from hf_compress.hub import push_to_hub

    folder = tmp_path / "ckpt"
    _student().save_pretrained(folder)
    with pytest.raises(ValueError, match=r"^repo_id must look like `namespace/name`, got 'a/b/c'\.$"):
        push_to_hub(str(folder), "a/b/c", endpoint="http://127.0.0.1:1", token="x")
    with pytest.raises(ValueError, match=r"^folder '.*nowhere' does not exist; save the compressed checkpoint there first\.$"):
        push_to_hub(str(tmp_path / "nowhere"), "me/tiny", endpoint="http://127.0.0.1:1", token="x")


def test_report_json_of_checkpoint_is_checked(tmp_path):
    # `validate_checkpoint` reads every JSON of the folder: a half-written trainer_state.json is caught.
    ckpt = _fake_checkpoint(tmp_path / "checkpoint-2")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps(state)[:20])
    with pytest.raises(ValueError, match=r"checkpoint-2/trainer_state\.json is not valid JSON \("):
        validate_checkpoint(str(ckpt))


def test_deepspeed_config_stage_is_read(tmp_path):
    from types import SimpleNamespace

    from hf_compress.callbacks import QATCallback
    from hf_compress.quantization import QuantizationArguments

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    qat = QATCallback(QuantizationArguments())
    for deepspeed in ({"zero_optimization": {"stage": 3}}, str(config)):
        args = SimpleNamespace(fsdp=None, deepspeed=deepspeed, world_size=2)
        with pytest.raises(ValueError, match=r"^`QATCallback` cannot run under DeepSpeed ZeRO-3"):
            check_distributed_support(args, [qat])
    args = SimpleNamespace(fsdp=None, deepspeed={"zero_optimization": {"stage": 2}}, world_size=2)
    assert check_distributed_support(args, [qat]) == "deepspeed"


@pytest.mark.parametrize("deepspeed", [{"zero_optimization": {"stage": 3}}, "file"])
def test_hf_compress_under_zero3_is_refused_before_any_data(deepspeed, tmp_path):
    # The pipeline evaluates and exports the in-memory model after training; ZeRO-3 leaves every rank a slice.
    from hf_compress.pipeline.arguments import ModelArguments
    from hf_compress.pipeline.plan import check_launch
    from hf_compress.tasks import CompressionInputError

    if deepspeed == "file":
        deepspeed = str(tmp_path / "ds.json")
        (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    args = SimpleNamespace(fsdp=None, deepspeed=deepspeed, world_size=1)
    with pytest.raises(CompressionInputError, match=r"^hf-compress evaluates, exports and checks the model it trained in "
                                                    r"memory, whose weights DeepSpeed ZeRO-3 keeps partitioned"):
        check_launch(ModelArguments(), args, PruningArguments())
    args.deepspeed = {"zero_optimization": {"stage": 2}}  # full weights on every rank: not refused here
    check_launch(ModelArguments(), args, PruningArguments(target_sparsity=0.0))
