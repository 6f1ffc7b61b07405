"""The agent's pipeline of actors: capture -> recorder -> limiter -> uplink."""
