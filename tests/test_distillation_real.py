"""The real MiniLM-L6 teacher, fine-tuned on Rotten Tomatoes, distilled into a 3-layer student."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer

from conftest import REAL_EVAL_ROWS, evaluate_accuracy
from hf_compress.distillation import DistillationArguments, layer_dropped_student
from hf_compress.trainers import DistillationTrainer

STEPS = 150


@pytest.mark.slow
def test_distilled_student_beats_the_same_student_trained_without_teacher(real_finetuned, real_finetuned_accuracy,
                                                                         real_data, tmp_path):
    tok, ds = real_data
    train = ds["train"].shuffle(seed=1).select(range(STEPS * 16))
    teacher = AutoModelForSequenceClassification.from_pretrained(real_finetuned)
    assert len(ds["test"]) == REAL_EVAL_ROWS
    accuracy = {"teacher (6 layers)": real_finetuned_accuracy(REAL_EVAL_ROWS)}  # the teacher is `real_finetuned`

    for name in ("plain", "distilled"):
        torch.manual_seed(0)
        student = layer_dropped_student(teacher, [0, 2, 4])
        # Same student, data order, seed and steps; only the loss differs (alpha = 0 is plain cross-entropy).
        args = DistillationArguments(
            output_dir=str(tmp_path / name), max_steps=STEPS, per_device_train_batch_size=16, learning_rate=5e-5,
            report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
            temperature=2.0, alpha=0.0 if name == "plain" else 0.9, cache_teacher_logits=name == "distilled",
        )
        if name == "plain":
            trainer = Trainer(model=student, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok))
        else:
            trainer = DistillationTrainer(
                model=student, teacher_model=teacher, args=args, train_dataset=train,
                data_collator=DataCollatorWithPadding(tok), processing_class=tok,
            )
        trainer.train()
        accuracy[name] = evaluate_accuracy(student, ds["test"], tok)
    print("\nheld-out accuracy (first 1,000 rows of the fixed test split):", accuracy)
    assert accuracy["teacher (6 layers)"] > 0.75
    assert accuracy["distilled"] > accuracy["plain"]
