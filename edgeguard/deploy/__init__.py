"""`edgeguard deploy`: put signed bundles onto devices over SSH, validate them there, switch `current` atomically.

ssh.py (OpenSSH through subprocess), inventory.py (hosts and fleet.toml), fleet.py (the per-device steps,
concurrency, the result table), loopback.py (a throwaway sshd on 127.0.0.1 that stands in for a device).
"""
