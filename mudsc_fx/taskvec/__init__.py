"""Task-vector merging for models fine-tuned from one base: Task Arithmetic, TIES, EMR-Merging.

``tau_t = theta_t - theta_0``. Inputs are loaded lazily (``sources``); the merge methods live in
``arithmetic`` (one merged model) and ``emr`` (a shared task vector plus per-task bit masks and
rescalers, stored by ``emr_artifact``).
"""

from .arithmetic import task_arithmetic, task_heads, ties_merge
from .emr import EMRModel, EMRSize, TaskIndexError, emr_merge

__all__ = ["task_arithmetic", "ties_merge", "task_heads", "emr_merge", "EMRModel", "EMRSize", "TaskIndexError"]
