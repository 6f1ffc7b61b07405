"""What the keruta agent and hub share: records, wire frames, limits and actors."""

__version__ = "0.1.0"
