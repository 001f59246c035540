"""`--format dense`: plain `save_pretrained` safetensors, which every transformers loader reads."""

from __future__ import annotations

from .base import CheckpointFormat, load_with_auto_class


class DenseFormat(CheckpointFormat):
    """Full-precision (or pruned, zeros stored) weights as `save_pretrained` writes them: the format every other one
    falls back to."""

    name = "dense"

    @classmethod
    def detect(cls, folder, config: dict) -> bool:
        return True  # checked last: whatever no other format claims

    def save(self, model, tokenizer, folder: str, args=None, task: str | None = None) -> dict:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return {"format": "safetensors"}

    def load(self, folder: str, **kwargs):
        return load_with_auto_class(folder, **kwargs)

    def export(self, model, tokenizer, folder: str, args=None, task: str | None = None):
        from tqdm.auto import tqdm

        with tqdm(total=1, desc="Exporting", leave=False) as bar:
            info = self.save(model, tokenizer, folder, args, task=task)
            bar.update()
        # The in-memory model, not a reload: the pipeline's self-check then loads the written folder against it.
        return model.eval(), info, None

    def card_note(self, report: dict, folder, low_bit_embeddings: bool) -> str:
        return "Dense safetensors: loads anywhere transformers runs."
