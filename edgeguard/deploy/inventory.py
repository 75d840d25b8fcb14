"""Devices from `--host user@device[:port]` strings and from a fleet inventory (fleet.toml).

    [defaults]                      # optional; every key below may also sit on a device
    user = "edge"
    port = 22
    identity = "~/.ssh/edgeguard_fleet"
    known_hosts = "~/.ssh/edgeguard_known_hosts"
    root = "~/edgeguard"            # the bundle store on the device
    python = "python3"

    [[device]]
    name = "gate-north"             # optional label for the table
    host = "10.20.0.11"             # or "user@host:port"
"""
from __future__ import annotations

import re
from dataclasses import fields, replace
from pathlib import Path

from ..errors import EdgeguardError
from .ssh import Device

_KEYS = {"name", "host", "user", "port", "identity", "known_hosts", "root", "python", "accept_new_host_key",
         "connect_timeout", "ssh_options"}
_HOST = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:@\[\]\s]+))(?::(?P<port>\d+))?$")


def parse_host(text: str, defaults: Device | None = None) -> Device:
    """`user@host`, `host:2222`, `user@[::1]:2222` → Device (unset parts come from `defaults`)."""
    m = _HOST.match(text.strip())
    if not m:
        raise EdgeguardError(f"--host {text!r}: expected user@host[:port] (IPv6 as user@[addr]:port)")
    base = defaults or Device(host="")
    port = int(m["port"]) if m["port"] else base.port
    if not 0 < port < 65536:
        raise EdgeguardError(f"--host {text!r}: port {port} is out of range")
    return replace(base, host=m["v6"] or m["host"], user=m["user"] or base.user, port=port, name="")


def load_inventory(path: str | Path, defaults: Device | None = None) -> list[Device]:
    """Read fleet.toml: [defaults] then [[device]] tables; unknown keys are an error, not a silent typo."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise EdgeguardError(f"--inventory {path}: cannot read it ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise EdgeguardError(f"--inventory {path}: not valid TOML ({e})") from None
    unknown_top = set(data) - {"defaults", "device"}
    if unknown_top:
        raise EdgeguardError(f"--inventory {path}: unknown table(s) {sorted(unknown_top)}; use [defaults] and "
                             "[[device]]")
    base = _apply(defaults or Device(host=""), data.get("defaults", {}), f"{path} [defaults]", path.parent)
    devices = []
    for i, entry in enumerate(data.get("device", [])):
        where = f"{path} [[device]] #{i + 1}"
        if "host" not in entry:
            raise EdgeguardError(f"{where}: needs host = \"user@address[:port]\"")
        dev = parse_host(str(entry["host"]), _apply(base, {k: v for k, v in entry.items() if k != "host"}, where,
                                                     path.parent))
        if entry.get("name"):
            dev.name = str(entry["name"])
        devices.append(dev)
    if not devices:
        raise EdgeguardError(f"--inventory {path}: no [[device]] entries")
    names = [d.name for d in devices]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise EdgeguardError(f"--inventory {path}: device names must be unique, repeated: {sorted(dup)}")
    return devices


def _apply(base: Device, values: dict, where: str, rel_to: Path) -> Device:
    unknown = set(values) - _KEYS
    if unknown:
        raise EdgeguardError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_KEYS)}")
    types = {f.name: f.type for f in fields(Device)}
    out = {}
    for k, v in values.items():
        if k == "port" and not isinstance(v, int):
            raise EdgeguardError(f"{where}: port must be an integer, got {v!r}")
        if k in ("identity", "known_hosts") and not str(v).startswith(("~", "/")):
            v = str(rel_to / v)  # relative paths are relative to the inventory file
        if k == "ssh_options" and not (isinstance(v, list) and all(isinstance(s, str) for s in v)):
            raise EdgeguardError(f"{where}: ssh_options must be a list of strings like \"Ciphers=aes128-ctr\"")
        if "bool" in str(types.get(k)) and not isinstance(v, bool):
            raise EdgeguardError(f"{where}: {k} must be true or false")
        out[k] = v
    return replace(base, **out)
