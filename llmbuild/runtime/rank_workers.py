"""RankWorkers: ranks 1..N-1 of a tensor-parallel engine, each in a worker process, stepped by rank 0.

    rank 0 (this process)                          rank r (`python -m llmbuild.runtime.rank_workers`)
    spawn the workers, wait for them on a store    connect to the store, say "ready"
    join the process group (gloo)                  join the process group
    Engine.load(rank 0)                            Engine.load(rank r)
    all_gather (weight bytes, or the load error)   all_gather; exit on any error
    plan memory; broadcast ALLOCATE num_blocks ->  allocate its share of the KV cache
    each step: broadcast STEP header + inputs  ->  run its graph on them
          (the graphs' all-reduces meet: every rank runs every step)
    idle: KEEP_ALIVE every few seconds         ->  (a waiting worker never hits the group timeout)
    close: broadcast STOP, join                ->  exit

Only rank 0 schedules and samples; a worker sees the step inputs (so every rank holds the same
block tables) and nothing else. All communication is torch.distributed's, on two gloo groups over
the same ranks: the world group carries only the graphs' all-reduces, a second "control" group the
headers, step inputs and start-up handshake.
NOTE: the split is load-bearing. A compiled graph waits for its all-reduce holding the GIL, while
gloo's worker thread may still be freeing the previous broadcast's tensors, which were made in
Python and need the GIL to die: on one group that deadlocks (seen here on the first step). Workers take torchrun's
environment contract (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and are fresh interpreters, so
the launching program needs no `if __name__ == "__main__"` guard (as multiprocessing's spawn would).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from llmbuild.errors import EngineError
from llmbuild.model_config import DTYPES
from llmbuild.runtime.engine import Engine
from llmbuild.runtime.graph import Graph
from llmbuild.runtime.kv_cache import allocate_kv_cache
from llmbuild.runtime.lora_adapter import load_adapter
from llmbuild.runtime.step_inputs import StepInputs, StepShape
from llmbuild.tensor_parallel import GROUP_NAME, rank_config

STOP, STEP, KEEP_ALIVE, ALLOCATE, LOAD_LORA = 0, 1, 2, 3, 4
HEADER = 4  # [kind, tokens, sequences, logit rows] (ALLOCATE: [kind, num_blocks, 0, 0])
# LOAD_LORA: [kind, slot, bytes, 0], then that many bytes of JSON {"name", "path"}: each rank reads its
# own shard of the adapter (rank 0 has checked it) into the slot
TIMEOUT = dt.timedelta(minutes=5)
"""How long any collective may wait for a peer: far above a step, and the keep-alive's period."""
KEEP_ALIVE_SECONDS = 10.0
STARTUP_SECONDS = 120.0
"""How long the workers may take to start (import torch) and reach the store."""


def _join(store: dist.TCPStore, rank: int, tp: int) -> dist.ProcessGroup:
    """Join the world group (the graphs' all-reduces) and return the control group (everything else)."""
    dist.init_process_group("gloo", store=store, rank=rank, world_size=tp, timeout=TIMEOUT)
    world = dist.group.WORLD
    if world is None or world.group_name != GROUP_NAME:
        raise EngineError(
            f"the process group is not named {GROUP_NAME!r} as the engine's graphs expect; "
            "run a tensor-parallel engine in a process of its own"
        )
    return dist.new_group(backend="gloo", timeout=TIMEOUT)


def _broadcast_header(group: dist.ProcessGroup, kind: int, a: int = 0, b: int = 0, c: int = 0) -> None:
    dist.broadcast(torch.tensor([kind, a, b, c], dtype=torch.int64), src=0, group=group)


def _receive_header(group: dist.ProcessGroup) -> list[int]:
    header = torch.empty(HEADER, dtype=torch.int64)
    dist.broadcast(header, src=0, group=group)
    return header.tolist()


class RankWorkers:
    """The worker processes of ranks 1..N-1 and the process group they share with this process (rank 0)."""

    def __init__(self, procs: list[subprocess.Popen], threads_before: int) -> None:
        self.procs = procs
        self.weight_bytes = 0
        """Weight bytes of all ranks together (set by launch)."""
        self._threads_before = threads_before
        self._group: dist.ProcessGroup | None = None
        """The control group (see the module doc), once joined."""
        self._last_send = time.monotonic()
        self._serving = False
        """True once every rank loaded its engine: from then on the workers wait for headers."""
        self._stopped = False

    @classmethod
    def launch(cls, path: Path, tp: int, *, verify: bool, backend: str | None) -> tuple[RankWorkers, Engine]:
        """Start ranks 1..tp-1 in worker processes and load rank 0 here; returns (workers, rank 0's engine).

        Raises EngineError naming the rank when any rank fails to start or to load its engine.
        """
        if dist.is_initialized():
            raise EngineError("a tensor-parallel engine is already running in this process; close() it first")
        threads_before = torch.get_num_threads()
        threads = max(1, threads_before // tp)  # the ranks share this machine's cores
        store = dist.TCPStore("127.0.0.1", 0, tp, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
        args = [sys.executable, "-m", __name__, str(path), f"--threads={threads}", f"--backend={backend or ''}"]
        args += [] if verify else ["--no-verify"]
        env = {**os.environ, "WORLD_SIZE": str(tp), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port)}
        procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(1, tp)]
        workers = cls(procs, threads_before)
        try:
            workers._group = group = workers._rendezvous(store, tp)
            torch.set_num_threads(threads)
            engine, statuses = _load_rank(group, path, 0, tp, verify, backend)
            for rank, (_, error) in enumerate(statuses):
                if error:
                    raise EngineError(error if rank == 0 else f"tensor-parallel rank {rank}: {error}")
            assert engine is not None  # rank 0 reported no error
            workers.weight_bytes = sum(weight_bytes for weight_bytes, _ in statuses)
            workers._serving = True
            return workers, engine
        except BaseException as exc:
            dead = None
            if isinstance(exc, RuntimeError):  # a collective failed: did a worker die while loading?
                try:
                    workers.raise_if_dead(wait=2.0)
                except EngineError as err:
                    dead = err
            workers.stop()
            if dead is not None:
                raise dead from exc
            raise

    def _rendezvous(self, store: dist.TCPStore, tp: int) -> dist.ProcessGroup:
        """Wait until every worker reached the store (failing fast if one dies), then join the groups."""
        keys = [f"ready{r}" for r in range(1, tp)]
        deadline = time.monotonic() + STARTUP_SECONDS
        while not store.check(keys):
            self.raise_if_dead()
            if time.monotonic() > deadline:
                raise EngineError(f"tensor-parallel workers did not start within {STARTUP_SECONDS:.0f} s")
            time.sleep(0.05)
        return _join(store, 0, tp)

    @property
    def group(self) -> dist.ProcessGroup:
        assert self._group is not None, "used before launch() joined the groups"
        return self._group

    def allocate(self, num_blocks: int) -> None:
        """Tell the workers the KV-cache size rank 0 planned; they allocate their shares."""
        _broadcast_header(self.group, ALLOCATE, num_blocks)

    def step(self, graph: Graph, inputs: StepInputs, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """Run one step on every rank; returns rank 0's logits."""
        shape = inputs.shape()
        try:
            _broadcast_header(self.group, STEP, shape.tokens, shape.seqs, shape.rows)
            dist.broadcast(inputs.flatten(), src=0, group=self.group)
            self._last_send = time.monotonic()
            return graph(inputs.as_tuple(), kv_caches)
        except RuntimeError as exc:  # a collective failed: name the worker that died, if one did
            self.raise_if_dead(wait=2.0)
            raise EngineError(f"tensor-parallel step failed: {str(exc).splitlines()[0]}") from exc

    def load_lora(self, slot: int, name: str, path: Path) -> None:
        """Have every worker write its shard of the adapter at `path` into `slot` (before the step using it)."""
        payload = torch.frombuffer(bytearray(json.dumps({"name": name, "path": str(path)}).encode()), dtype=torch.uint8)
        _broadcast_header(self.group, LOAD_LORA, slot, len(payload))
        dist.broadcast(payload, src=0, group=self.group)
        self._last_send = time.monotonic()

    def keep_alive(self) -> None:
        """Called while idle: fail if a worker died, and keep the waiting workers inside the group timeout."""
        self.raise_if_dead()
        if time.monotonic() - self._last_send > KEEP_ALIVE_SECONDS:
            _broadcast_header(self.group, KEEP_ALIVE)
            self._last_send = time.monotonic()

    def raise_if_dead(self, wait: float = 0.0) -> None:
        """Raise EngineError naming the first worker that exited (waiting up to `wait` s for one to)."""
        deadline = time.monotonic() + wait
        while True:
            for rank, proc in enumerate(self.procs, start=1):
                if proc.poll() is not None and not self._stopped:
                    raise EngineError(
                        f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with code {proc.returncode}; "
                        "the engine cannot run without it (see that worker's error above)"
                    )
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the workers and leave the process group (idempotent)."""
        if self._stopped:
            return
        if self._serving and all(p.poll() is None for p in self.procs):
            try:
                _broadcast_header(self.group, STOP)
            except RuntimeError:
                pass  # a worker is gone already: the others see the broken group and exit
        self._stopped = True
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._threads_before)


def _load_rank(
    group: dist.ProcessGroup, path: Path, rank: int, tp: int, verify: bool, backend: str | None
) -> tuple[Engine | None, list[tuple[int, str]]]:
    """Load this process's rank, then learn every rank's (weight bytes, load error or "").

    Every rank takes part in the exchange, failed or not, so that none waits for one that gave up.
    """
    engine, status = None, (0, "")
    try:
        engine = Engine.load(path, rank, verify=verify, backend=backend)
        status = (engine.weight_bytes, "")
    except EngineError as exc:
        status = (0, str(exc))
    statuses: list[tuple[int, str] | None] = [None] * tp
    dist.all_gather_object(statuses, status, group=group)
    return engine, [s for s in statuses if s is not None]


def _receive_step(group: dist.ProcessGroup, header: list[int], max_blocks_per_seq: int) -> StepInputs:
    """The step inputs rank 0 broadcast after a STEP header."""
    _, tokens, seqs, rows = header
    shape = StepShape(tokens, seqs, rows, max_blocks_per_seq)
    payload = torch.empty(StepInputs.flat_size(shape), dtype=torch.int64)
    dist.broadcast(payload, src=0, group=group)
    return StepInputs.unflatten(payload, shape)


def _receive_lora(group: dist.ProcessGroup, engine: Engine, slot: int, size: int) -> None:
    """Write this rank's shard of the adapter rank 0 names into `slot` of the engine's LoRA buffers."""
    payload = torch.empty(size, dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=group)
    named = json.loads(bytes(payload.tolist()).decode())
    manifest = engine.manifest
    assert manifest.lora is not None  # rank 0 loads adapters only into an engine with slots
    adapter = load_adapter(
        named["name"], Path(named["path"]), manifest.model, manifest.lora, DTYPES[manifest.dtype],
        manifest.target.tensor_parallel, engine.rank,
    )  # fmt: skip
    adapter.write_to(engine.lora_buffers, slot)


def _worker_main(path: str, verify: bool, backend: str | None, threads: int) -> None:
    """A worker process: join the group, load its rank, then run every step rank 0 broadcasts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 decides
    torch.set_num_threads(threads)
    rank, tp = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(host, port, tp, is_master=False, timeout=TIMEOUT)
    store.set(f"ready{rank}", "1")
    group = _join(store, rank, tp)
    try:
        engine, statuses = _load_rank(group, Path(path), rank, tp, verify, backend)
        if engine is None or any(error for _, error in statuses):
            return
        manifest = engine.manifest
        block_size = manifest.kv_cache.block_size
        max_blocks_per_seq = math.ceil(manifest.limits.max_seq_len / block_size)
        kv_caches: list[torch.Tensor] = []
        with torch.inference_mode():
            while (header := _receive_header(group))[0] != STOP:
                if header[0] == ALLOCATE:
                    model = rank_config(manifest.model, tp)
                    kv_caches = allocate_kv_cache(model, header[1], block_size, engine.kv_cache_dtype)
                elif header[0] == STEP:
                    engine.graph(_receive_step(group, header, max_blocks_per_seq).as_tuple(), kv_caches)
                elif header[0] == LOAD_LORA:
                    _receive_lora(group, engine, header[1], header[2])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A tensor-parallel worker (started by rank 0; see the module doc).")
    parser.add_argument("engine")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--backend", default="")
    parser.add_argument("--no-verify", action="store_true")
    cli = parser.parse_args()
    _worker_main(cli.engine, not cli.no_verify, cli.backend or None, cli.threads)
