"""One WebSocket connection: the Trio driver (connection.py) and its sans-IO parts."""
