"""`PruningArguments`: the options of gradual magnitude pruning, parseable by `HfArgumentParser`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .masks import parse_nm


@dataclass
class PruningArguments:
    r"""
    Options of [`GradualPruningCallback`]. Field names carry a `pruning_` prefix (or are `target_sparsity`)
    so they sit next to `TrainingArguments` in one `HfArgumentParser`.

    Parameters:
        target_sparsity (`float`, *optional*, defaults to `0.5`):
            Fraction of each pruned weight (or of all of them, with `pruning_scope="global"`) that is zero from
            `pruning_end_step` on. In [0, 1).
        pruning_initial_sparsity (`float`, *optional*, defaults to `0.0`):
            Sparsity applied at `pruning_start_step` ($s_i$ of Zhu & Gupta).
        pruning_start_step (`int`, *optional*, defaults to `0`):
            First optimizer step at which masks are computed.
        pruning_end_step (`int`, *optional*):
            Optimizer step at which `target_sparsity` is reached exactly. Defaults to
            `pruning_end_fraction * max_steps`.
        pruning_end_fraction (`float`, *optional*, defaults to `0.75`):
            End of the schedule as a fraction of training, used when `pruning_end_step` is not set; the rest of
            training fine-tunes at the final sparsity.
        pruning_frequency (`int`, *optional*, defaults to `10`):
            Optimizer steps between mask updates ($\Delta t$).
        pruning_scope (`str`, *optional*, defaults to `"layer"`):
            `"layer"`: every tensor reaches the sparsity; `"global"`: one magnitude threshold over all of them.
        pruning_pattern (`str`, *optional*):
            `"N:M"` (e.g. `"2:4"`) for semi-structured sparsity, applied once at `pruning_start_step`;
            then `target_sparsity` must be `1 - N/M`.
        pruning_target_modules (`list[str]`, *optional*):
            Regular expressions over module names; the matching `nn.Linear` weights are pruned. Defaults to every
            `nn.Linear` in the encoder/decoder blocks (no embeddings, norms, biases, pooler or task head).
        pruning_log_per_layer (`bool`, *optional*, defaults to `True`):
            Also log the sparsity of every pruned tensor, not only the global figure.
    """

    target_sparsity: float = field(default=0.5, metadata={"help": "Final sparsity in [0, 1), reached at the end step."})
    pruning_initial_sparsity: float = field(default=0.0, metadata={"help": "Sparsity at the start step."})
    pruning_start_step: int = field(default=0, metadata={"help": "First optimizer step that prunes."})
    pruning_end_step: int | None = field(
        default=None, metadata={"help": "Optimizer step at which target_sparsity is reached (default: end fraction)."}
    )
    pruning_end_fraction: float = field(
        default=0.75, metadata={"help": "End of the schedule as a fraction of max_steps, when no end step is given."}
    )
    pruning_frequency: int = field(default=10, metadata={"help": "Optimizer steps between mask updates."})
    pruning_scope: str = field(default="layer", metadata={"help": "'layer' (per-tensor) or 'global' threshold."})
    pruning_pattern: str | None = field(default=None, metadata={"help": "N:M semi-structured pattern, e.g. '2:4'."})
    pruning_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Regexes over module names to prune (default: Linear layers in the blocks)."}
    )
    pruning_log_per_layer: bool = field(default=True, metadata={"help": "Log the sparsity of every pruned tensor."})

    def __post_init__(self):
        # Types first, so a string from a hand-written config gets our message and not Python's comparison error.
        for name in ("target_sparsity", "pruning_initial_sparsity", "pruning_end_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
        for name in ("pruning_start_step", "pruning_end_step", "pruning_frequency"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}); it counts optimizer steps.")
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {self.target_sparsity}.")
        if not 0.0 <= self.pruning_initial_sparsity <= self.target_sparsity:
            raise ValueError(
                f"pruning_initial_sparsity must be in [0, target_sparsity={self.target_sparsity}], "
                f"got {self.pruning_initial_sparsity}."
            )
        if self.pruning_start_step < 0:
            raise ValueError(f"pruning_start_step must be >= 0, got {self.pruning_start_step}.")
        if self.pruning_end_step is not None and self.pruning_end_step <= self.pruning_start_step:
            raise ValueError(
                f"pruning_end_step must be > pruning_start_step={self.pruning_start_step}, got {self.pruning_end_step}."
            )
        if not 0.0 < self.pruning_end_fraction <= 1.0:
            raise ValueError(f"pruning_end_fraction must be in (0, 1], got {self.pruning_end_fraction}.")
        if self.pruning_frequency < 1:
            raise ValueError(f"pruning_frequency must be >= 1 optimizer step, got {self.pruning_frequency}.")
        if self.pruning_scope not in ("layer", "global"):
            raise ValueError(f"pruning_scope must be 'layer' or 'global', got {self.pruning_scope!r}.")
        if self.pruning_pattern is not None:
            n, m = parse_nm(self.pruning_pattern)
            if abs(self.target_sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(
                    f"pruning_pattern {self.pruning_pattern!r} fixes the sparsity at {1 - n / m}, but target_sparsity "
                    f"is {self.target_sparsity}; set target_sparsity={1 - n / m} or drop pruning_pattern."
                )
        if isinstance(self.pruning_target_modules, str):
            self.pruning_target_modules = [self.pruning_target_modules]
