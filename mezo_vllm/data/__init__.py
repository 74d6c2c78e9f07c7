"""Training data: example types, user files, built-in tasks, and tokenization into requests.

Everything an engine scores is a *request* (`types.Request`): context tokens followed by a
target span, whose summed log-probability is what MeZO's loss (`mezo_vllm.objective`) is built
from. A classification example yields one request for all options that differ only in their
last token, else one per option; a completion example yields one request.
"""

from .files import load_file
from .tasks import builtin_tasks, load_task, task_template
from .tokenize import Split, TokenizeReport, tokenize
from .types import CLASSIFICATION, COMPLETION, KINDS, DataError, Dataset, Example, Request, TaskSplits

__all__ = ["CLASSIFICATION", "COMPLETION", "KINDS", "DataError", "Dataset", "Example", "Request",
           "Split", "TaskSplits", "TokenizeReport", "builtin_tasks", "load_file", "load_task", "task_template",
           "tokenize"]
