"""Deprecated alias of [`hf_compress.pipeline`], kept so that `from hf_compress.compression import compress` (the
form earlier READMEs showed) keeps working; it warns once. Import from `hf_compress` (or `hf_compress.pipeline`)."""

from __future__ import annotations

import warnings

from .pipeline import (  # noqa: F401  (re-exported names of the old module)
    DEFAULT_OUTPUT_DIR,
    EXPORT_FORMATS,
    CompressionPlan,
    DataArguments,
    ModelArguments,
    check_output_dir,
    compress,
    describe_documents,
    describe_plan,
    load_config,
    load_dataset_any,
    prepare,
    run,
)

warnings.warn("`hf_compress.compression` is now `hf_compress.pipeline`; import `compress` from `hf_compress`.",
              FutureWarning, stacklevel=2)
