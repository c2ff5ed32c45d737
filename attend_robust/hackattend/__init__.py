"""HackAttend: the greedy attention-masking attack and its evaluator."""

from .config import HackAttendConfig
from .evaluator import HackAttendEvaluator
from .records import AttackRecord, ReplayResult, read_records, replay
from .report import format_report, summarize
from .search import HackAttendSearch, SearchResult

__all__ = [
    "AttackRecord",
    "HackAttendConfig",
    "HackAttendEvaluator",
    "HackAttendSearch",
    "ReplayResult",
    "SearchResult",
    "format_report",
    "read_records",
    "replay",
    "summarize",
]
