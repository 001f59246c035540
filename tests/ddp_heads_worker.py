"""A tiny Llama distilled under `python -m torch.distributed.run --nproc_per_node=2` (gloo, CPU), with both output
heads projected in the loss (`--fused 1`) or with full logits (`--fused 0`), for tests/test_distillation_heads.py.
Each rank writes `rank<r>.safetensors` (final weights) and `rank<r>.json` (log history, which heads were projected).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--fused", type=int, required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--dump-dir", required=True)
    a = p.parse_args(argv)
    sys.path.insert(0, HERE)
    import torch
    from datasets import Dataset
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM, default_data_collator

    from conftest import VOCAB, tiny_llama_config
    from hf_compress.distillation import DistillationArguments
    from hf_compress.trainers import DistillationTrainer

    def model(seed):
        torch.manual_seed(seed)
        m = LlamaForCausalLM(tiny_llama_config())
        with torch.no_grad():  # random norm weights: a wrong formula cannot hide behind ones
            for name, prm in m.named_parameters():
                if prm.dim() == 1:
                    prm.uniform_(0.5, 1.5)
        return m

    g = torch.Generator().manual_seed(0)
    lengths = [12, 9, 12, 5, 12, 7, 12, 12]
    ids = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    data = Dataset.from_dict({
        "input_ids": [r + [0] * (12 - len(r)) for r in ids],
        "attention_mask": [[1] * len(r) + [0] * (12 - len(r)) for r in ids],
        "labels": [r + [-100] * (12 - len(r)) for r in ids],
    })
    args = DistillationArguments(
        a.output_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2,
        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", temperature=2.0, alpha=0.5,
        disable_tqdm=True, seed=0, remove_unused_columns=False, ddp_backend="gloo",
    )
    trainer = DistillationTrainer(model=model(1), teacher_model=model(0), args=args, train_dataset=data,
                                  data_collator=default_data_collator)
    if not a.fused:
        trainer._output_heads = (None, None)
    trainer.train()
    rank = trainer.args.process_index
    os.makedirs(a.dump_dir, exist_ok=True)
    student = trainer.accelerator.unwrap_model(trainer.model)
    save_file({k: v.detach().contiguous() for k, v in student.state_dict().items()},
              os.path.join(a.dump_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(a.dump_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": trainer.args.world_size, "wrapped": type(trainer.model_wrapped).__name__,
                   "heads": [h is not None for h in trainer._output_heads],
                   "logs": [h for h in trainer.state.log_history if "hard_loss" in h]}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
