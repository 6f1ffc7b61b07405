"""The hub's actors: the writer and its syncer, the broadcaster, and the supervised services."""
