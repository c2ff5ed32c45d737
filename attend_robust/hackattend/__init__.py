"""HackAttend: the greedy attention-masking attack and its evaluator."""

from .config import HackAttendConfig
from .evaluator import HackAttendEvaluator
from .records import AttackRecord, ReplayResult, read_records, replay
from .report import format_report, summarize
from .search import HackAttendSearch, SearchResult, minimum_layer_evaluations
from .sequential import SequentialHackAttendSearch

__all__ = [
    "AttackRecord",
    "HackAttendConfig",
    "HackAttendEvaluator",
    "HackAttendSearch",
    "ReplayResult",
    "SearchResult",
    "SequentialHackAttendSearch",
    "format_report",
    "minimum_layer_evaluations",
    "read_records",
    "replay",
    "summarize",
]
