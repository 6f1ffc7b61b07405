"""The uplink's sans-IO core: window, acks, resend, frames; no I/O, no clock."""
