"""`GradualPruningCallback`: gradual magnitude pruning for any `transformers.Trainer` (plain, ours or TRL's)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import nullcontext

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .. import zero3
from ..architectures import weight_layout, weight_layouts
from ..fsdp import GatheredTensors, any_dtensor, full_tensor, is_dtensor, shard_like
from ..pruning.config import PruningArguments
from ..pruning.masks import (
    attach_masks,
    load_masks,
    magnitude_masks,
    nm_masks,
    remove_masks,
    resolve_targets,
    save_masks,
    sparsity_stats,
)
from ..pruning.schedule import cubic_sparsity, is_pruning_step
from ..pruning.self_check import check_batch, check_permanent

logger = logging.get_logger(__name__)

MASKS_NAME = "pruning_masks.safetensors"


def optimizer_preserves_zeros(optimizer) -> bool:
    """Whether `optimizer.step()` leaves an entry at exactly zero when its weight, gradient and state are zero.

    True for torch's `Adam`, `AdamW` (with `eps > 0`) and `SGD`: with a zero gradient their moments stay zero, the
    update is `0 / (0 + eps) = 0`, and decoupled or L2 weight decay of a zero weight is zero. The callback zeroes the
    gradients of pruned entries before each step, and their weights and optimizer state whenever the masks change,
    so with these optimizers the pruned weights cannot move. Any other optimizer (Adafactor, 8-bit optimizers whose
    quantized state need not decode to 0, ...) gets the masks re-applied after every step.
    """
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer  # accelerate's AcceleratedOptimizer, DeepSpeed's ZeRO optimizer: the torch one inside
    if type(inner) in (torch.optim.Adam, torch.optim.AdamW):
        return all(group.get("eps", 0) > 0 for group in inner.param_groups)
    return type(inner) is torch.optim.SGD


def _masked_grad(mask: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * mask

    return hook


def _masked_sharded_grad(mask: torch.Tensor):
    # FSDP2 writes a sharded parameter's `.grad` itself (after its reduce-scatter) instead of through autograd, so a
    # tensor hook on it never fires; it does call the post-accumulate-grad hooks, once per backward, before any
    # clipping or optimizer step sees the gradient.
    def hook(param: torch.Tensor) -> None:
        param.grad.mul_(mask)

    return hook


def _pruning_arguments(options: dict) -> PruningArguments:
    """A `PruningArguments` from the callback's keyword options: each is its field's name without `pruning_`."""
    fields = set(PruningArguments.__dataclass_fields__)
    names = {key: key if key in fields else f"pruning_{key}" for key in options}
    unknown = sorted(key for key, name in names.items() if name not in fields)
    if unknown:
        allowed = ", ".join(f.removeprefix("pruning_") for f in PruningArguments.__dataclass_fields__)
        raise TypeError(f"GradualPruningCallback got unknown options {unknown}; allowed: {allowed}.")
    return PruningArguments(**{names[key]: value for key, value in options.items()})


class GradualPruningCallback(TrainerCallback):
    r"""
    Prunes weights by magnitude on the cubic schedule of
    [Zhu & Gupta (2017)](https://arxiv.org/abs/1710.01878) while any `Trainer` trains.

    The schedule is counted in optimizer steps (`state.global_step`), so gradient accumulation does not shift
    it. Masks are boolean `<param>_mask` buffers on the pruned modules. Pruned entries stay exactly zero:
    their gradients are masked by a hook on the parameter as autograd produces them (so gradient clipping and the
    logged `grad_norm` never see them) and their optimizer state (`exp_avg`, `exp_avg_sq`,
    `momentum_buffer`, ...) whenever the masks change, so AdamW moments and weight decay cannot revive them;
    the masks are also re-applied after every optimizer step, which covers any other optimizer. The masks are
    saved into every checkpoint (`pruning_masks.safetensors`) and read back on `resume_from_checkpoint`. At
    the end of training they are made permanent and removed: the model is a plain `PreTrainedModel`. That step is
    self-checked: the logits on the first training batch (2 rows, 64 tokens) under the masks and after are compared
    ([`~hf_compress.pruning.self_check.check_permanent`]); beyond the tolerance `on_train_end` raises a
    [`~hf_compress.pruning.self_check.SelfCheckError`] in one line, before anything is saved, and otherwise
    `callback.check` holds the figures (`logit_scale`, `tolerance`, `permanent_vs_masked`) and `callback.check_batch`
    the batch, so that the saved folder can be checked against the model too
    ([`~hf_compress.pruning.self_check.check_reload`]).

    Args:
        args ([`PruningArguments`], *optional*): the options (`target_sparsity`, `pruning_*`).
        **kwargs: or the same options as keywords without their `pruning_` prefix, e.g.
            `GradualPruningCallback(target_sparsity=0.8, end_step=600, frequency=10)`: `target_sparsity`,
            `initial_sparsity`, `start_step`, `end_step` (defaults to `end_fraction * max_steps`), `end_fraction`,
            `frequency`, `scope` (`"layer"` or `"global"`), `pattern` (`"N:M"`, applied at `start_step`),
            `target_modules` (regexes over module names; defaults to every `nn.Linear` and `Conv1D` in the
            encoder/decoder blocks, [`~hf_compress.pruning.masks.default_targets`]; each part of a fused projection
            (q, k, v of `qkv_proj` / `c_attn` / `query_key_value`, gate and up of `gate_up_proj`, each expert of a
            known mixture of experts) is pruned to the target on its own with `scope="layer"`), `log_per_layer`.
            See [`PruningArguments`] for their defaults and checks.

    Example:

    ```python
    trainer = Trainer(model=model, args=training_args, train_dataset=ds,
                      callbacks=[GradualPruningCallback(PruningArguments(target_sparsity=0.8, pruning_frequency=10))])
    trainer.train()
    save_compressed(model, "pruned")  # bitmask + nonzero values
    ```
    """

    def __init__(self, args: PruningArguments | None = None, **kwargs):
        # One construction path: keywords become a `PruningArguments`, whose `__post_init__` checks every option.
        if args is None:
            args = _pruning_arguments(kwargs)
        elif kwargs:
            raise TypeError(
                f"GradualPruningCallback takes a `PruningArguments` or keyword options, not both (got {sorted(kwargs)})."
            )
        elif not isinstance(args, PruningArguments):
            raise TypeError(f"args must be a `PruningArguments`, got {type(args).__name__}.")
        self.config = args
        self.end_step = args.pruning_end_step
        self._pairs: list[tuple[str, torch.nn.Parameter, torch.Tensor]] = []
        self._active = False
        self._hooks: list = []
        self._layouts: dict = {}
        self._zero3 = False  # DeepSpeed ZeRO-3 partitions the weights: select and zero them whole (`hf_compress.zero3`)
        self.check: dict | None = None  # the self-check's figures, once the masks are permanent
        self.check_batch: dict | None = None

    @classmethod
    def from_args(cls, args: PruningArguments) -> GradualPruningCallback:
        """The same as `GradualPruningCallback(args)` (kept for older code)."""
        return cls(args)

    # --- schedule -----------------------------------------------------------------------------------------

    def _resolve_end_step(self, max_steps: int) -> int:
        c = self.config
        if c.pruning_end_step is not None:
            end = c.pruning_end_step
        else:
            end = max(c.pruning_start_step + 1, int(round(c.pruning_end_fraction * max_steps)))
        if max_steps > 0 and end > max_steps:
            raise ValueError(
                f"pruning_end_step {end} is beyond max_steps {max_steps}, so target_sparsity would never be reached; "
                "lower pruning_end_step (or pruning_end_fraction) or train longer."
            )
        return end

    def sparsity_at(self, step: int) -> float:
        """Scheduled sparsity after optimizer step `step` (the callback's `end_step` must be resolved)."""
        c = self.config
        if c.pruning_pattern is not None:
            return c.target_sparsity if step >= c.pruning_start_step else 0.0
        return cubic_sparsity(
            step, c.pruning_initial_sparsity, c.target_sparsity, c.pruning_start_step, self.end_step, c.pruning_frequency
        )

    def _is_event(self, step: int) -> bool:
        c = self.config
        if c.pruning_pattern is not None:
            return step == c.pruning_start_step
        return is_pruning_step(step, c.pruning_start_step, self.end_step, c.pruning_frequency)

    # --- masks --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _update_masks(self, step: int, optimizer=None) -> None:
        sparsity = self.sparsity_at(step)
        weights = {name: p for name, p, _ in self._pairs}
        current = {name: m for name, _, m in self._pairs}
        if self._zero3:  # the fp32 master weights, gathered one at a time; full masks on every rank
            weights = zero3.FullFP32Weights(weights)
        elif any_dtensor(weights.values()):
            # FSDP2 shards: the selection must see the whole matrices (layer and global scope alike), so it runs the
            # single-process code on weights all-gathered one at a time; every rank gets the same full masks and
            # keeps its own shard of them (`shard_like`). Exact by construction, at one all-gather per weight per
            # read (the global scope reads each weight four times).
            weights, current = GatheredTensors(weights), GatheredTensors(current)
        if self.config.pruning_pattern is not None:
            new = nm_masks(weights, self.config.pruning_pattern, layouts=self._layouts)
        else:
            new = magnitude_masks(
                weights, sparsity, self.config.pruning_scope, current_masks=current, layouts=self._layouts
            )
        for name, _, mask in self._pairs:
            mask.copy_(shard_like(new[name], mask))  # in place: the buffer object (and the cached pair) stays the same
        self._apply(optimizer)
        self._activate()

    def _activate(self) -> None:
        """Masks are in force: mask every gradient as autograd produces it, before anything else sees it.

        `Trainer` clips (and measures the logged `grad_norm`) before `on_pre_optimizer_step`, so zeroing gradients in
        a callback event comes too late for both. A hook on the parameter multiplies each micro-batch's gradient by the
        mask before it is accumulated into `.grad` (and before DDP's all-reduce, which hooks the accumulation), so
        gradient accumulation, clipping, `grad_norm` and the optimizer all see only the gradients of kept weights.
        """
        self._active = True
        if self._hooks:
            return
        for _, param, mask in self._pairs:
            if not param.requires_grad:  # frozen weights (a PEFT base layer) get no gradient
                continue
            if is_dtensor(param):
                self._hooks.append(param.register_post_accumulate_grad_hook(_masked_sharded_grad(mask)))
            else:
                self._hooks.append(param.register_hook(_masked_grad(mask)))

    @torch.no_grad()
    def _apply(self, optimizer=None) -> None:
        if self._zero3:  # master weight, optimizer states and compute copy, through DeepSpeed
            for _, param, mask in self._pairs:
                zero3.masked_fill_(param, mask)
            return
        state = getattr(optimizer, "state", None) if optimizer is not None else None
        for _, param, mask in self._pairs:
            param.masked_fill_(~mask, 0.0)
            if state is not None and param in state:
                for value in state[param].values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        value.masked_fill_(~mask, 0.0)

    # --- events -------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.end_step = self._resolve_end_step(state.max_steps)
        names = resolve_targets(model, self.config.pruning_target_modules)
        params = dict(model.named_parameters(remove_duplicate=False))
        self._zero3 = zero3.any_partitioned(params[n] for n in names)
        if self._zero3:  # full-shape masks and layouts, read from each weight gathered in turn
            masks, self._layouts = {}, {}
            for name in names:
                with zero3.gathered([params[name]]):
                    masks.update(attach_masks(model, [name]))
                    self._layouts[name] = weight_layout(model, name)
        else:
            masks = attach_masks(model, names)
            # Conv1D's input axis and the parts of fused projections / stacked experts, read once from the architecture.
            self._layouts = weight_layouts(model, names)
        self._pairs = [(name, params[name], masks[name]) for name in names]
        if state.global_step > 0:
            self._restore(args, state, model, optimizer)
        elif self._is_event(0) and self.sparsity_at(0) > 0:
            self._update_masks(0, optimizer)

    @torch.no_grad()
    def _restore(self, args, state, model, optimizer) -> None:
        # Resuming: the checkpoint's masks are authoritative. Trainer does not tell callbacks which checkpoint it
        # resumed from, so look where it saves them (`<output_dir>/checkpoint-<global_step>`).
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", MASKS_NAME)
        if os.path.isfile(path):
            saved = load_masks(path)
            missing = [name for name, _, _ in self._pairs if name not in saved]
            if missing:
                raise ValueError(f"{path} has no mask for {missing[:3]}; resume with the same target_modules.")
            for name, _, mask in self._pairs:
                mask.copy_(shard_like(saved[name].to(mask.device), mask))
        else:
            # A checkpoint from elsewhere: pruned weights are exact zeros, so the zeros are the masks.
            logger.warning(f"No {MASKS_NAME} at {path}; rebuilding the pruning masks from the zero weights.")
            for _, param, mask in self._pairs:
                with zero3.gathered([param]) if self._zero3 else nullcontext():
                    mask.copy_(param != 0)
        if any(not bool(mask.all()) for _, _, mask in self._pairs):
            self._activate()
        self._apply(optimizer)

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # The gradient hooks already zeroed the pruned entries; this pass covers gradients written without autograd
        # hooks (e.g. an engine that fills `.grad` itself), so Adam's moments for them stay zero. (ZeRO-3 keeps no
        # `.grad`: it reduces the hooked gradients into its partitions and steps inside `backward`.)
        if self._active and not self._zero3:
            pairs = [(param.grad, mask) for _, param, mask in self._pairs if param.grad is not None]
            if pairs:
                # One fused call over all tensors (what torch's own optimizers use): the per-step cost stays small.
                torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # Re-apply the masks after the step, unless the optimizer provably keeps pruned entries at exactly zero
        # (`optimizer_preserves_zeros`): then this pass over every pruned weight is a no-op, and skipping it halves
        # the callback's per-step cost.
        if self._active and not optimizer_preserves_zeros(optimizer):
            if self._zero3:
                return self._apply(optimizer)
            torch._foreach_mul_([param for _, param, _ in self._pairs], [mask for _, _, mask in self._pairs])

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        # global_step now counts the optimizer steps done: prune on the schedule's events.
        if self._is_event(state.global_step):
            self._update_masks(state.global_step, optimizer)

    def on_save(self, args, state, control, **kwargs):
        masks = {name: mask for name, _, mask in self._pairs}
        if any_dtensor(masks.values()):  # FSDP2: every rank takes part in the all-gather, rank 0 writes
            masks = {name: full_tensor(mask) for name, mask in masks.items()}
        if state.is_world_process_zero and self._pairs:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                from ..atomic import atomic_file

                with atomic_file(os.path.join(folder, MASKS_NAME)) as tmp:  # whole or absent, mode 0o666 & ~umask
                    save_masks(masks, tmp)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None or not self._pairs:
            return
        if self._zero3:  # the weights are partitioned: the masks' zeros (what the callback keeps at zero)
            layers = {name: 1.0 - float(mask.float().mean()) for name, _, mask in self._pairs}
            total = sum(mask.numel() for _, _, mask in self._pairs)
            stats = {"sparsity": sum(layers[n] * m.numel() for n, _, m in self._pairs) / total, "layers": layers}
        else:
            stats = sparsity_stats(model, [name for name, _, _ in self._pairs])
        entries = {"sparsity": round(stats["sparsity"], 6), "sparsity_target": round(self.sparsity_at(state.global_step), 6)}
        if self.config.pruning_log_per_layer:
            entries.update({f"sparsity/{name}": round(v, 6) for name, v in stats["layers"].items()})
        logs.update(entries)
        # Trainer.log appends a copy of `logs` to log_history before callbacks run; add the figures there too so
        # they are saved in trainer_state.json.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)

    def _make_permanent(self, model) -> None:
        if self._zero3:  # zero through DeepSpeed, then drop the buffers
            self._apply()
            remove_masks(model, apply=False)
        else:
            remove_masks(model)

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        try:
            if model is not None and self._pairs:
                # The batch is read only now, after the last step: reading it earlier would draw from the sampler's
                # random state and change the order the run trains in.
                first = next(iter(train_dataloader), None) if train_dataloader is not None else None
                batches = [dict(first)] if isinstance(first, Mapping) else None
                self.check_batch = check_batch(model, batches)
                self.check = check_permanent(model, self.check_batch, self._make_permanent)
        finally:
            for handle in self._hooks:
                handle.remove()
            self._hooks = []
            self._pairs = []
            self._active = False
