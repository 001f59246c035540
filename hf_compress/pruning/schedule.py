"""The cubic sparsity schedule of Zhu & Gupta (2017), as a pure function of the optimizer step."""

from __future__ import annotations


def _check_schedule(initial_sparsity: float, target_sparsity: float, start_step: int, end_step: int, frequency: int):
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}.")
    if not 0.0 <= initial_sparsity <= target_sparsity:
        raise ValueError(
            f"initial_sparsity must be in [0, target_sparsity={target_sparsity}], got {initial_sparsity}."
        )
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    if end_step <= start_step:
        raise ValueError(f"end_step must be > start_step={start_step}, got {end_step}.")
    if frequency < 1:
        raise ValueError(f"frequency must be >= 1 optimizer step, got {frequency}.")


def cubic_sparsity(
    step: int,
    initial_sparsity: float = 0.0,
    target_sparsity: float = 0.5,
    start_step: int = 0,
    end_step: int = 100,
    frequency: int = 1,
) -> float:
    r"""
    Sparsity at optimizer step `step` on the gradual pruning schedule of
    [Zhu & Gupta (2017), "To prune, or not to prune"](https://arxiv.org/abs/1710.01878):

    $$s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{n\,\Delta t}\right)^3, \quad t \in \{t_0, t_0 + \Delta t, \dots, t_0 + n\Delta t\}$$

    with `n * frequency = end_step - start_step`. Between pruning events the sparsity holds its last value
    (a step function of `t`); before `start_step` it is `0.0` (nothing pruned) and from `end_step` on it is
    exactly `target_sparsity`, even when `end_step - start_step` is not a multiple of `frequency`.

    Args:
        step (`int`): optimizer step (`TrainerState.global_step`), so gradient accumulation does not shift it.
        initial_sparsity (`float`, *optional*, defaults to `0.0`): $s_i$, the sparsity at `start_step`.
        target_sparsity (`float`, *optional*, defaults to `0.5`): $s_f$, reached at `end_step`.
        start_step (`int`, *optional*, defaults to `0`): $t_0$.
        end_step (`int`, *optional*, defaults to `100`): $t_0 + n\Delta t$.
        frequency (`int`, *optional*, defaults to `1`): $\Delta t$, optimizer steps between pruning events.

    Returns:
        `float`: the fraction of weights to be zero after step `step`.
    """
    _check_schedule(initial_sparsity, target_sparsity, start_step, end_step, frequency)
    if step < start_step:
        return 0.0
    if step >= end_step:
        return float(target_sparsity)
    t = start_step + ((step - start_step) // frequency) * frequency
    progress = (t - start_step) / (end_step - start_step)
    return target_sparsity + (initial_sparsity - target_sparsity) * (1.0 - progress) ** 3


def is_pruning_step(step: int, start_step: int, end_step: int, frequency: int) -> bool:
    """Whether the masks are recomputed after optimizer step `step` (every `frequency` steps from `start_step`, and at `end_step`)."""
    return start_step <= step <= end_step and ((step - start_step) % frequency == 0 or step == end_step)
