"""Host RAM: how much there is and how much is available now, read in one place.

Linux's `/proc/meminfo` first (`MemAvailable`: what can be allocated without swapping, the number the
kernel's out-of-memory killer is about), psutil where that file is absent (macOS, Windows), and an
explicit unknown (`HostRAM.unknown` says why) where neither answers: callers then plan without a RAM
check and log the reason instead of refusing a run on a guess.

`host_ram()` is what the planner's `Budget` calls; tests replace it (monkeypatch this module's
`host_ram`) so that no test depends on the machine's free memory.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)
MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class HostRAM:
    """Bytes of host RAM in all (`total`) and available now (`available`); None where unknown, and then
    `unknown` says why (empty when both are known). `source` names where the numbers came from."""

    total: Optional[int]
    available: Optional[int]
    source: str
    unknown: str = ""

    @property
    def known(self) -> bool:
        return self.total is not None and self.available is not None


def parse_meminfo(text: str) -> Optional[HostRAM]:
    """`MemTotal` and `MemAvailable` (kB) of a /proc/meminfo text, or None when either is missing
    (kernels before 3.14 have no MemAvailable: their free + cache is not the same number)."""
    fields = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    if "MemTotal" not in fields or "MemAvailable" not in fields:
        return None
    return HostRAM(fields["MemTotal"], fields["MemAvailable"], "/proc/meminfo")


def read_host_ram(meminfo: Path = MEMINFO, psutil_module: str = "psutil") -> HostRAM:
    """The machine's RAM now: `meminfo` if readable, else psutil, else unknown (with the reasons)."""
    reasons = []
    try:
        parsed = parse_meminfo(meminfo.read_text())
    except OSError as err:
        reasons.append(f"{meminfo} unreadable ({err.strerror or err})")
    else:
        if parsed is not None:
            return parsed
        reasons.append(f"{meminfo} has no MemTotal/MemAvailable")
    try:
        psutil = importlib.import_module(psutil_module)
    except ImportError:
        reasons.append(f"{psutil_module} is not installed")
    else:
        try:
            memory = psutil.virtual_memory()
            return HostRAM(int(memory.total), int(memory.available), psutil_module)
        except (OSError, getattr(psutil, "Error", OSError)) as err:
            reasons.append(f"{psutil_module} failed ({err})")
    return HostRAM(None, None, "none", unknown="; ".join(reasons))


def host_ram() -> HostRAM:
    """What the planner's budget reads (tests replace this function)."""
    return read_host_ram()


__all__ = ["HostRAM", "host_ram", "parse_meminfo", "read_host_ram"]
