"""The agent's pipeline of actors: capture -> recorder -> throttle -> uplink."""
