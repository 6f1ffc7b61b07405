"""keruta-hub: the web service that stores and serves task logs."""
