"""Everything about where artifacts live: keys, atomic commits, ledgers, schemas, the catalog."""

from storage.store import Store

__all__ = ["Store"]
