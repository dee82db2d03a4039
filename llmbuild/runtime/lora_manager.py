"""LoraManager: the adapters an engine serves and the slots they take turns in.

Adapters are registered by name (read and checked once, kept in host memory); a step's requests name
theirs, and `assign` puts every adapter of the step into a slot of the graph's buffers before the step
runs: one already there stays, else it takes a free slot or the least recently used one no request of
the step needs. The scheduler admits no more distinct adapters into the running batch than the engine
has slots, so a slot is always found (runtime/scheduler.py), and a request whose adapter is not loaded
waits for a slot instead of being refused: every registered adapter is reachable, however many.

Each registration gets a fresh id, and a request holds the registration it named: an adapter unloaded (or
replaced under its name) while requests still use it keeps serving them, and the prefix cache never mixes
KV blocks computed under different adapters (block hashes start from the id: runtime/scheduler.py).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmbuild.errors import LoraError, RequestError
from llmbuild.model_config import DTYPES
from llmbuild.runtime.engine import Engine
from llmbuild.runtime.lora_adapter import LoraAdapter, load_adapter
from llmbuild.runtime.rank_workers import RankWorkers
from llmbuild.runtime.request import Request


@dataclass(frozen=True, slots=True)
class ServedAdapter:
    """A registered adapter: its name, the id of this registration, and its tensors (this rank's)."""

    name: str
    lora_id: int
    path: Path
    adapter: LoraAdapter


class LoraManager:
    """Registered adapters (by name) and which adapter id each slot holds."""

    def __init__(self, engine: Engine, workers: RankWorkers | None = None) -> None:
        if engine.manifest.lora is None:
            raise ValueError("the engine has no LoRA slots")
        self.engine = engine
        self.workers = workers
        self.section = engine.manifest.lora
        self.adapters: dict[str, ServedAdapter] = {}
        self._ids = itertools.count(1)
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, least recently used first
        self._free = list(range(self.section.max_loras, 0, -1))  # slot 0 is "no adapter"
        self.num_loads = 0
        """Adapters written into a slot so far (a registered adapter's first use, or its return after eviction)."""

    @property
    def max_loras(self) -> int:
        return self.section.max_loras

    def register(self, name: str, path: str | Path) -> ServedAdapter:
        """Read and check the adapter at `path` and serve it as `name` (nothing changes on an error)."""
        if name in self.adapters:
            raise LoraError(f"LoRA adapter {name!r} is already loaded; unload it first or pick another name")
        manifest, path = self.engine.manifest, Path(path)
        tp = manifest.target.tensor_parallel
        adapter = load_adapter(name, path, manifest.model, self.section, DTYPES[manifest.dtype], tp, self.engine.rank)
        served = ServedAdapter(name, next(self._ids), path, adapter)
        self.adapters[name] = served
        return served

    def unregister(self, name: str) -> None:
        """Stop serving `name` to new requests (requests already admitted with it finish with it)."""
        if self.adapters.pop(name, None) is None:
            raise RequestError(f"LoRA adapter {name!r} is not loaded")

    def resolve(self, name: str) -> ServedAdapter:
        """The adapter registered as `name`."""
        served = self.adapters.get(name)
        if served is None:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise RequestError(f"no LoRA adapter named {name!r} is loaded (loaded: {known})")
        return served

    def assign(self, requests: Iterable[Request]) -> None:
        """Put the adapter of every request of a step into a slot and set the requests' lora_slot."""
        requests = list(requests)
        needed = {r.lora.lora_id: r.lora for r in requests if r.lora is not None}
        if len(needed) > self.max_loras:  # the scheduler never lets this happen
            raise RuntimeError(f"a step needs {len(needed)} adapters but the engine has {self.max_loras} slots")
        for lora_id, served in needed.items():
            if lora_id in self._slot_of:
                self._slot_of.move_to_end(lora_id)
            else:
                self._load(served, needed)
        for r in requests:
            r.lora_slot = self._slot_of[r.lora.lora_id] if r.lora is not None else 0

    def _load(self, served: ServedAdapter, needed: dict[int, ServedAdapter]) -> None:
        if not self._free:
            victim = next(i for i in self._slot_of if i not in needed)
            self._free.append(self._slot_of.pop(victim))
        slot = self._free.pop()
        served.adapter.write_to(self.engine.lora_buffers, slot)
        if self.workers is not None:
            self.workers.load_lora(slot, served.name, served.path)
        self._slot_of[served.lora_id] = slot
        self.num_loads += 1

    def slots_in_use(self) -> int:
        """Slots holding an adapter (loaded adapters stay in their slot until another needs it)."""
        return len(self._slot_of)


def register_adapters(
    manager: LoraManager | None, engine_path: Path, loras: Sequence[tuple[str, str | Path]], base_name: str
) -> None:
    """Register each (name, PEFT directory) adapter (`--lora NAME=DIR`); LoraError naming the first bad one."""
    if loras and manager is None:
        raise LoraError(f"{engine_path} has no LoRA slots; rebuild it with a recipe `lora` section to use --lora")
    for name, path in loras:
        if name == base_name:
            raise LoraError(f"--lora {name}={path}: {name!r} is the base model's name; pick another")
        assert manager is not None
        manager.register(name, path)
