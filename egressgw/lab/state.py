"""What a running lab is made of, on disk, so another process can inspect or remove it.

In/out: ``<statedir>/state.json`` (namespaces created, processes started, file paths). The record is
rewritten after every step of ``lab up``, so ``lab down`` can clean up after a crash half-way.
Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from egressgw.lab.topology import STATE_ROOT

STATE_FILE = "state.json"


def state_dir(name: str, root: str = STATE_ROOT) -> Path:
    return Path(root) / name


@dataclass
class ProcessRecord:
    """A process the lab started, with a word from its command line to recognise it by.

    The marker guards against signalling an unrelated process that reused the pid.
    """

    pid: int
    netns: str
    argv: list[str]
    log: str
    marker: str


@dataclass
class LabState:
    name: str
    statedir: str
    namespaces: list[str] = field(default_factory=list)
    etc_netns_dirs: list[str] = field(default_factory=list)
    processes: dict[str, ProcessRecord] = field(default_factory=dict)
    policies_dir: str = ""
    daemon_args: list[str] = field(default_factory=list)  # the gateways' extra arguments
    down_nodes: list[str] = field(default_factory=list)  # nodes taken down (unplugged)
    timings_s: dict[str, float] = field(default_factory=dict)  # how long `up` took, by phase
    started_at: float = 0.0
    ready: bool = False

    @property
    def path(self) -> Path:
        return Path(self.statedir) / STATE_FILE

    def save(self) -> None:
        """Write atomically, so a reader never sees half a record."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, statedir: Path) -> LabState | None:
        """The recorded state, or None if there is none (or it cannot be read)."""
        try:
            raw = json.loads((statedir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        try:
            processes = {
                role: ProcessRecord(**record) for role, record in raw.pop("processes", {}).items()
            }
            return cls(processes=processes, **raw)
        except TypeError:
            return None
