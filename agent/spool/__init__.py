"""The durable local spool (spool.py), its segment files (segment.py), its
directory lock (lock.py) and its in-memory tail (recent.py)."""

from agent.spool.segment import HEADER, encode_frame
from agent.spool.spool import Spool, SpoolLocked, default_root, spooled_tasks, write_atomically

__all__ = ["HEADER", "Spool", "SpoolLocked", "default_root", "encode_frame", "spooled_tasks", "write_atomically"]
