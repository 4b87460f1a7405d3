"""Which exceptions are the user's to fix, and their one-line messages.

Anything not listed here is a bug and keeps its traceback.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A command's arguments do not fit the store (an unknown rationale id, ...)."""


class DaskError(ValueError):
    """The Dask cluster asked for cannot be used (unreachable, malformed, extra not installed).
    Here, not in flows/shards.py, so that naming it does not import Prefect."""


def user_error(exc: BaseException) -> str | None:
    from storage.catalog import CatalogError
    from storage.store import StageIncomplete, StoreNotWritable
    from tasks.stages.dataset import DatasetError
    from tasks.config.pipeline import ConfigError
    from tasks.teacher_backends.base import FatalTeacherError, TeacherInputError
    from tasks.core.export import ExportError

    from flows.comparison import CompareError
    from flows.selection import StageSelectionError

    known: tuple[type[BaseException], ...] = (
        ConfigError,
        DatasetError,
        StageSelectionError,
        CatalogError,
        StageIncomplete,
        StoreNotWritable,
        FatalTeacherError,
        TeacherInputError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
        UsageError,
        CompareError,
        ExportError,
        DaskError,
    )
    if isinstance(exc, known):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None
