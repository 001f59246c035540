"""Knowledge distillation: pure loss functions, teacher handling and the teacher-logit cache."""

from .config import DistillationArguments
from .hub_cache import load_hub_teacher_cache, push_teacher_cache
from .loss import DistillationLoss, HeadLogits, distillation_loss, loss_mask, soft_target_kl, teacher_top_k
from .student import layer_dropped_student
from .teacher import check_compatible, infer_task

__all__ = [
    "DistillationArguments",
    "DistillationLoss",
    "HeadLogits",
    "check_compatible",
    "distillation_loss",
    "infer_task",
    "layer_dropped_student",
    "load_hub_teacher_cache",
    "loss_mask",
    "push_teacher_cache",
    "soft_target_kl",
    "teacher_top_k",
]
