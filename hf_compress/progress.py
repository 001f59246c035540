"""Console output of a pipeline stage: one progress bar with its ETA, and one estimate line after the first steps.

It replaces the `Trainer`'s own `ProgressCallback` / `PrinterCallback`, which print every log dict (with the
pruning callback's per-layer sparsity: 40 keys every `logging_steps`) on stdout. Those dicts still reach
`trainer_state.log_history` (kept in the compression report) and the `report_to` loggers.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class StageProgressCallback(TrainerCallback):
    """
    One bar for one training stage (`desc`), the latest loss in its postfix, and after `estimate_after` optimizer
    steps one line with the measured seconds per step and the time left for the stage. Only the main process
    writes; with `disable_tqdm` the bar is off but the estimate line is still printed.

    Args:
        desc (`str`): the stage's name, e.g. `"Fine-tuning with pruning to 80%"`.
        estimate_after (`int`, defaults to 5): steps measured before the estimate (the first step, which builds the
            optimizer and warms the kernels, is excluded from the rate when there are more).
    """

    def __init__(self, desc: str, estimate_after: int = 5):
        self.desc = desc
        self.estimate_after = estimate_after
        self.bar = None
        self._t1 = None
        self._estimated = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, desc=self.desc, disable=args.disable_tqdm, dynamic_ncols=True,
                        initial=state.global_step)
        self._start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        self.bar.update(state.global_step - self.bar.n)
        if state.global_step == 1:
            self._t1 = time.time()
        done = state.global_step
        if not self._estimated and done >= min(self.estimate_after, state.max_steps):
            self._estimated = True
            if self._t1 is not None and done > 1:
                rate = (time.time() - self._t1) / (done - 1)
            else:
                rate = (time.time() - self._start) / max(done, 1)
            left = rate * (state.max_steps - done)
            from tqdm.auto import tqdm

            tqdm.write(f"[hf-compress] {self.desc}: {rate:.2f} s/step over the first {done} steps; about "
                       f"{_duration(left)} left of {state.max_steps} steps (finishing ~{time.strftime('%H:%M', time.localtime(time.time() + left))}).")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
