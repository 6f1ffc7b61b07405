"""The durable local spool (spool.py), its segment files (segment.py), its
directory lock (lock.py), its task.json (meta.py), its in-memory tail
(recent.py) and where spools live (root.py)."""
