"""Task-vector merging for models fine-tuned from one base: Task Arithmetic, TIES, EMR-Merging.

``tau_t = theta_t - theta_0``. Every method reads the task vectors through one stream
(``stream``: tensor by tensor, chunk by chunk, safetensors files read lazily), so the same
code merges modules in memory (``task_arithmetic``, ``ties_merge``, ``emr_merge``) and
checkpoint files out of core (``merge_checkpoints``). Methods are registered in ``registry``
(name, options, defaults, drivers); one module each: ``arithmetic``, ``ties`` (with the exact
streaming top-k threshold of ``topk``) and ``emr`` (result ``emr_model.EMRModel``, file
format ``emr_artifact``). ``vector_layout`` says which entries are merged, kept per task or copied.
"""

from . import arithmetic, ties, emr  # noqa: F401  (importing a method module registers it)
from .arithmetic import task_arithmetic
from .driver import MergeFileResult, merge_checkpoints
from .emr import emr_merge
from .emr_model import EMRModel, EMRSize, TaskIndexError
from .heads import task_heads
from .registry import Option, TaskVectorMethod, get_method, method_names, register_method
from .ties import ties_merge

__all__ = ["task_arithmetic", "ties_merge", "task_heads", "emr_merge", "EMRModel", "EMRSize", "TaskIndexError",
           "merge_checkpoints", "MergeFileResult", "get_method", "method_names", "register_method",
           "TaskVectorMethod", "Option"]
