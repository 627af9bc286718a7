"""clickflow: ingest website clickstream data into analytic tables.

This namespace is clickflow's public face: what a plugin author needs to write a source or a
sink, and nothing else. The modules behind it (``clickflow.api``, ``clickflow.runtime``, ...)
are internal and may change.
"""

from clickflow.api import (
    Acknowledger,
    AnySink,
    AnySource,
    Handler,
    Message,
    NoAck,
    PermanentWriteError,
    RowBatch,
    Sink,
    SinkBatch,
    SinkContext,
    Source,
    SourceContext,
)
from clickflow.dlq import DeadLetterGroup, DeadLetterPage, DeadLetterQuery, DeadLetterStore, StoredDeadLetter
from clickflow.hookspecs import Register, hookimpl
from clickflow.options import (
    BatchLimits,
    ByteSize,
    Duration,
    OptionGroup,
    OptionsError,
    PositiveInt,
    RetryPolicy,
    SinkOptions,
    SourceOptions,
    check_range,
    validate_options,
)
from clickflow.parser import VisitContext
from clickflow.schema import TABLE_NAMES, TABLES, Column, DeadLetterCol, EventCol, ItemCol, Table, VisitCol

__all__ = [
    "TABLES",
    "TABLE_NAMES",
    "Acknowledger",
    "AnySink",
    "AnySource",
    "BatchLimits",
    "ByteSize",
    "Column",
    "DeadLetterCol",
    "DeadLetterGroup",
    "DeadLetterPage",
    "DeadLetterQuery",
    "DeadLetterStore",
    "Duration",
    "EventCol",
    "Handler",
    "ItemCol",
    "Message",
    "NoAck",
    "OptionGroup",
    "OptionsError",
    "PermanentWriteError",
    "PositiveInt",
    "Register",
    "RetryPolicy",
    "RowBatch",
    "Sink",
    "SinkBatch",
    "SinkContext",
    "SinkOptions",
    "Source",
    "SourceContext",
    "SourceOptions",
    "StoredDeadLetter",
    "Table",
    "VisitCol",
    "VisitContext",
    "check_range",
    "hookimpl",
    "validate_options",
]
