"""Architecture knowledge in one place: what each model family looks like to the compression techniques.

Structured pruning, unstructured pruning, QAT and the exports ask this module where a family keeps its blocks,
norms, embedding scale, fused projections, Conv1D layers and task heads, and what it cannot express, instead of
switching on model types themselves. A family that is not listed here is refused in one line before any work.
"""

from __future__ import annotations

# ---- families: blocks, norms, embeddings, heads (structured pruning) ------------------------------------------


# ---- fused projections and Conv1D layers (unstructured pruning, QAT, exports) ---------------------------------
