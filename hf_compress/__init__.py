"""hf_compress: smaller Hugging Face models that stay accurate, with the proof in the model card."""

__version__ = "0.1.0"
