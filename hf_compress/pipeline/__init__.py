"""The `hf-compress` pipeline: [`prepare`] checks the inputs into a frozen [`CompressionPlan`], [`run`] executes it
stage by stage, [`compress`] is both in one call.

- `arguments`: the pipeline's own options ([`ModelArguments`], [`DataArguments`]).
- `data`: reading datasets and configs, the train / held-out split.
- `plan`: [`prepare`], [`CompressionPlan`], the output-folder checks and [`describe_plan`].
- `context`: the [`RunContext`] the stages share, and the run's scratch folder.
- `stages`, `training`: the stages before the export; `export`: the export stage; `report`: evaluation, loaders
  check and the report; `output`: card, the swap into `output_dir`, the push.
- `runner`: [`run`], the list of stages, and [`compress`].
"""

from .arguments import DEFAULT_OUTPUT_DIR, EXPORT_FORMATS, DataArguments, ModelArguments
from .data import describe_documents, load_config, load_dataset_any
from .plan import CompressionPlan, check_output_dir, describe_plan, prepare, training_examples
from .runner import compress, run

__all__ = [
    "DEFAULT_OUTPUT_DIR",
    "EXPORT_FORMATS",
    "CompressionPlan",
    "DataArguments",
    "ModelArguments",
    "check_output_dir",
    "compress",
    "describe_documents",
    "describe_plan",
    "load_config",
    "load_dataset_any",
    "prepare",
    "run",
    "training_examples",
]
