"""Training data: example types, user files and records, built-in tasks, and tokenization into requests.

Everything an engine scores is a *request* (`types.Request`): context tokens followed by a
target span, whose summed log-probability is what MeZO's loss (`mezo_vllm.objective`) is built
from. A classification example yields one request for all options that differ only in their
last token, else one per option; a completion example (text and chat records are completions)
yields one request.
"""

from .chat import tokenizer_loader
from .files import load_file, save_records
from .holdout import hold_out
from .records import load_records
from .tasks import builtin_tasks, load_task, task_template
from .tokenize import Split, TokenizeReport, tokenize
from .types import CLASSIFICATION, COMPLETION, KINDS, DataError, Dataset, Example, Request, TaskSplits

__all__ = ["CLASSIFICATION", "COMPLETION", "KINDS", "DataError", "Dataset", "Example", "Request",
           "Split", "TaskSplits", "TokenizeReport", "builtin_tasks", "hold_out", "load_file", "load_records",
           "load_task", "save_records", "task_template", "tokenize", "tokenizer_loader"]
