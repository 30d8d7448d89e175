"""The SQL store: jobs, their items and events, and registered presets.

Light on purpose: the API process imports this and must never pull in keras
or torch.
"""

from lmq.core.names import JobKind, JobState
from lmq.core.store.db import SchemaOutOfDate, session_scope, sessions, upgrade
from lmq.core.store.models import Job, JobEvent, JobItem, Preset

__all__ = [
    "Job",
    "JobEvent",
    "JobItem",
    "JobKind",
    "JobState",
    "Preset",
    "SchemaOutOfDate",
    "session_scope",
    "sessions",
    "upgrade",
]
