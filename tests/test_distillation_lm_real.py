"""The real SmolLM2-135M distilled into a half-depth student on Hamlet (cached top-64 teacher).

At CI size the robust fact is the one distillation optimises: on held-out Hamlet the distilled student is closer to
the teacher (lower KL(teacher || student)) than the same student trained as long with cross-entropy only. Held-out
perplexity of both is printed, not asserted: the perplexity win needs a corrected teacher and 60 steps, which
`python -m benchmarks.lm_distillation` measures (README: 71.56 distilled vs 82.96 cross-entropy only).
"""

import pytest
import torch

STEPS, BATCH, SEQ = 6, 4, 64


@torch.no_grad()
def held_out_kl(student, teacher, blocks) -> float:
    from hf_compress.distillation import soft_target_kl

    ids = torch.tensor(blocks["input_ids"])
    student.eval()
    return soft_target_kl(student(input_ids=ids).logits, teacher(input_ids=ids).logits, temperature=1.0).item()


@pytest.mark.slow
def test_distilled_half_depth_smollm2_is_closer_to_the_teacher_than_cross_entropy_only(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from benchmarks.lm_distillation import half_layers, hamlet_blocks, perplexity
    from hf_compress.distillation import DistillationArguments, layer_dropped_student
    from hf_compress.models import smollm2_path
    from hf_compress.trainers import DistillationTrainer

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    data = hamlet_blocks(tok, SEQ)
    train, held_out = data["train"].select(range(STEPS * BATCH)), data["test"].select(range(8))
    kl, ppl = {}, {}
    for name in ("ce", "distilled"):
        torch.manual_seed(0)
        student = layer_dropped_student(teacher, half_layers(teacher.config.num_hidden_layers))
        # Same student, data order, seed and steps; only the loss differs.
        args = DistillationArguments(
            output_dir=str(tmp_path / name), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=2e-4,
            lr_scheduler_type="constant", report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
            alpha=0.9, temperature=1.0, cache_teacher_logits=name == "distilled",
            teacher_logits_top_k=64 if name == "distilled" else None, teacher_cache_dir=str(tmp_path / "cache"),
        )
        if name == "ce":
            Trainer(model=student, args=args, train_dataset=train).train()
        else:
            trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train, processing_class=tok)
            assert trainer.teacher_cache.num_rows == len(train)
            trainer.train()
        kl[name], ppl[name] = held_out_kl(student, teacher, held_out), perplexity(student, held_out)
    print(f"\nheld-out Hamlet after {STEPS} steps (8 test blocks of {SEQ} tokens): KL to teacher {kl}, perplexity {ppl}")
    assert kl["distilled"] < kl["ce"]
