"""The real SmolLM2-135M distilled into a half-depth student on Hamlet: held-out perplexity beats cross-entropy alone."""

import pytest
import torch

STEPS, BATCH, SEQ = 8, 4, 64


@pytest.mark.slow
def test_distilled_half_depth_smollm2_beats_cross_entropy_only_on_held_out_hamlet(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from benchmarks.lm_distillation import half_layers, hamlet_blocks, perplexity
    from hf_compress.distillation import DistillationArguments, layer_dropped_student
    from hf_compress.models import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    data = hamlet_blocks(tok, SEQ)
    train, held_out = data["train"].select(range(STEPS * BATCH)), data["test"].select(range(8))
    ppl = {}
    for name in ("ce", "distilled"):
        torch.manual_seed(0)
        student = layer_dropped_student(teacher, half_layers(teacher.config.num_hidden_layers))
        # Same student, data order, seed and steps; only the loss differs.
        args = DistillationArguments(
            output_dir=str(tmp_path / name), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=2e-4,
            lr_scheduler_type="constant", report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
            alpha=0.9, temperature=1.0, cache_teacher_logits=name == "distilled", teacher_logits_top_k=64 if name == "distilled" else None,
            teacher_cache_dir=str(tmp_path / "cache"),
        )
        if name == "ce":
            Trainer(model=student, args=args, train_dataset=train).train()
        else:
            from hf_compress.trainers import DistillationTrainer

            trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train, processing_class=tok)
            assert trainer.teacher_cache.num_rows == len(train)
            trainer.train()
        ppl[name] = perplexity(student, held_out)
    print(f"\nheld-out Hamlet perplexity after {STEPS} steps (8 test blocks of {SEQ} tokens): {ppl}")
    assert ppl["distilled"] < ppl["ce"]
