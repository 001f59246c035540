"""`StructuredPruningArguments`: the options of structured (Minitron-style) pruning, parseable by `HfArgumentParser`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .structured import STRUCTURES


@dataclass
class StructuredPruningArguments:
    r"""
    Options of structured width / depth pruning ([`~hf_compress.pruning.structured_prune`] one-shot before training,
    or [`StructuredPruningCallback`] gradually during it). Every field has a `prune_` prefix so it sits beside
    `TrainingArguments` in one `HfArgumentParser`.

    A kept amount is a fraction in (0, 1] or a whole count > 1 (e.g. `--prune_layers_keep 4` keeps 4 blocks).

    Parameters:
        prune_structure (`str`, *optional*):
            Comma-separated structures to remove: `ffn` (FFN neurons), `heads` (whole GQA groups: a KV head with its
            query heads), `hidden` (hidden/embedding channels), `layers` (blocks). Which families can express which
            is `hf_compress.architectures.FAMILIES` (the README's support matrix); the others are refused in
            `prepare`. Unset: no structured pruning.
        prune_keep (`float`, *optional*):
            Kept fraction (or count) for every structure in `prune_structure` that has no value of its own.
        prune_ffn_keep, prune_heads_keep, prune_hidden_keep, prune_layers_keep (`float`, *optional*):
            Kept amount of one structure: FFN neurons per layer, KV groups per layer, hidden channels, blocks.
        prune_target_params (`int`, *optional*):
            Instead of kept amounts: the largest single kept fraction, applied to every structure, whose model has
            at most this many parameters.
        prune_calibration_batches (`int`, *optional*, defaults to `16`):
            Training batches whose activations score the structures (0: weight magnitudes instead).
        prune_layer_metric (`str`, *optional*, defaults to `"cosine"`):
            Block importance: `cosine` (`1 - cos(input, output)`) or `loss` (loss increase when skipped).
        prune_schedule (`str`, *optional*, defaults to `"oneshot"`):
            `oneshot`: remove before training (then train / distil the smaller model). `gradual`: mask the structures
            step by step during training and remove them physically at the end of training.
        prune_end_fraction (`float`, *optional*, defaults to `0.5`):
            `gradual`: fraction of training by which every dropped structure is masked.
        prune_frequency (`int`, *optional*, defaults to `10`):
            `gradual`: optimizer steps between mask updates.
    """

    prune_structure: str | None = field(
        default=None, metadata={"help": f"Structures to remove, comma-separated subset of {','.join(STRUCTURES)}."}
    )
    prune_keep: float | None = field(default=None, metadata={"help": "Kept fraction (or count) for every structure."})
    prune_ffn_keep: float | None = field(default=None, metadata={"help": "Kept FFN neurons per layer (fraction or count)."})
    prune_heads_keep: float | None = field(default=None, metadata={"help": "Kept KV head groups per layer (fraction or count)."})
    prune_hidden_keep: float | None = field(default=None, metadata={"help": "Kept hidden channels (fraction or count)."})
    prune_layers_keep: float | None = field(default=None, metadata={"help": "Kept blocks (fraction or count)."})
    prune_target_params: int | None = field(
        default=None, metadata={"help": "Target parameter count (instead of kept amounts)."}
    )
    prune_calibration_batches: int = field(
        default=16, metadata={"help": "Training batches that score the structures (0: weight magnitudes)."}
    )
    prune_layer_metric: str = field(default="cosine", metadata={"help": "Block importance: 'cosine' or 'loss'."})
    prune_schedule: str = field(default="oneshot", metadata={"help": "'oneshot' (before training) or 'gradual'."})
    prune_end_fraction: float = field(default=0.5, metadata={"help": "gradual: fraction of training to reach the target."})
    prune_frequency: int = field(default=10, metadata={"help": "gradual: optimizer steps between mask updates."})

    def __post_init__(self):
        if self.prune_structure is None:
            return
        structures = self.structures
        bad = [s for s in structures if s not in STRUCTURES]
        if bad or not structures:
            raise ValueError(
                f"prune_structure must be a comma-separated subset of {','.join(STRUCTURES)}, got {self.prune_structure!r}."
            )
        for name in ("prune_keep", "prune_ffn_keep", "prune_heads_keep", "prune_hidden_keep", "prune_layers_keep"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}.")
            if not (0 < value <= 1 or (value > 1 and float(value).is_integer())):
                raise ValueError(f"{name} must be a fraction in (0, 1] or a whole count > 1, got {value}.")
        if self.prune_target_params is not None:
            if isinstance(self.prune_target_params, bool) or not isinstance(self.prune_target_params, int) or self.prune_target_params <= 0:
                raise ValueError(f"prune_target_params must be a positive integer, got {self.prune_target_params!r}.")
            if any(getattr(self, f"prune_{s}_keep") is not None for s in STRUCTURES) or self.prune_keep is not None:
                raise ValueError("pass either prune_target_params or kept amounts (prune_keep, prune_<structure>_keep), not both.")
        else:
            missing = [s for s in structures if getattr(self, f"prune_{s}_keep") is None and self.prune_keep is None]
            if missing:
                raise ValueError(
                    f"prune_structure={self.prune_structure!r} needs a target for {','.join(missing)}: set "
                    f"--prune_keep, --prune_{missing[0]}_keep or --prune_target_params."
                )
        if self.prune_layer_metric not in ("cosine", "loss"):
            raise ValueError(f"prune_layer_metric must be 'cosine' or 'loss', got {self.prune_layer_metric!r}.")
        if self.prune_schedule not in ("oneshot", "gradual"):
            raise ValueError(f"prune_schedule must be 'oneshot' or 'gradual', got {self.prune_schedule!r}.")
        if not 0.0 < self.prune_end_fraction <= 1.0:
            raise ValueError(f"prune_end_fraction must be in (0, 1], got {self.prune_end_fraction}.")
        if self.prune_frequency < 1:
            raise ValueError(f"prune_frequency must be >= 1 optimizer step, got {self.prune_frequency}.")
        if self.prune_calibration_batches < 0:
            raise ValueError(f"prune_calibration_batches must be >= 0, got {self.prune_calibration_batches}.")

    @property
    def enabled(self) -> bool:
        return self.prune_structure is not None

    @property
    def structures(self) -> list[str]:
        return [s.strip() for s in (self.prune_structure or "").split(",") if s.strip()]

    def keep(self) -> dict | None:
        """Kept amount per structure, or `None` when `prune_target_params` decides."""
        if self.prune_target_params is not None:
            return None
        out = {}
        for s in self.structures:
            v = getattr(self, f"prune_{s}_keep")
            v = self.prune_keep if v is None else v
            out[s] = int(v) if v > 1 else float(v)
        return out
