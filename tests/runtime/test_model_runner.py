"""ModelRunner.prepare packs a StepBatch into the graph's named inputs, and host-to-device copies are
asynchronous exactly when their source is pinned (a cuda runner), never from pageable memory."""

from __future__ import annotations

import pytest
import torch

from llmbuild.runtime.block_pool import BlockPool
from llmbuild.runtime.model_runner import ModelRunner
from llmbuild.runtime.request import Request
from llmbuild.runtime.sampling_params import SamplingParams
from llmbuild.runtime.scheduler import Scheduler, SchedulerConfig
from llmbuild.runtime.step_inputs import INPUT_NAMES, StepInputs

BS, MAX_SEQ_LEN, VOCAB = 4, 32, 8
WIDTH = MAX_SEQ_LEN // BS
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory)")


class RecordingGraph:
    """Stands in for an engine graph: records the inputs of each call, returns zero logits."""

    def __init__(self) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, inputs: tuple[torch.Tensor, ...], kv_caches: list[torch.Tensor]) -> torch.Tensor:
        named = dict(zip(INPUT_NAMES, inputs, strict=True))
        self.calls.append(named)
        return torch.zeros(named["logits_indices"].shape[0], VOCAB, device=kv_caches[0].device)


def runner_on(device: str) -> tuple[ModelRunner, RecordingGraph]:
    graph = RecordingGraph()
    caches = [torch.zeros(16, 1, BS, 2, device=device) for _ in range(2)]
    return ModelRunner(graph, caches, BS, MAX_SEQ_LEN), graph  # type: ignore[arg-type]  # a stand-in graph


def two_prompts() -> tuple[Scheduler, list[Request]]:
    """A scheduler with prompts of 5 and 3 tokens waiting."""
    scheduler = Scheduler(SchedulerConfig(4, 64, MAX_SEQ_LEN, BS, frozenset({2})), BlockPool(16))
    params = SamplingParams(max_tokens=4)
    requests = [Request("a", [10, 11, 12, 13, 14], params, 4), Request("b", [20, 21, 22], params, 4)]
    for request in requests:
        scheduler.add(request)
    return scheduler, requests


def slot(request: Request, position: int) -> int:
    return request.block_ids[position // BS] * BS + position % BS


def test_a_packed_prefill_then_a_decode_step():
    runner, _ = runner_on("cpu")
    scheduler, (a, b) = two_prompts()
    batch = scheduler.schedule()
    inputs, num_rows = runner.prepare(batch)
    assert num_rows == 2
    assert inputs.input_ids.tolist() == [10, 11, 12, 13, 14, 20, 21, 22]
    assert inputs.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert inputs.slot_mapping.tolist() == [slot(a, p) for p in range(5)] + [slot(b, p) for p in range(3)]
    assert inputs.block_tables.tolist() == [r.block_ids + [0] * (WIDTH - len(r.block_ids)) for r in (a, b)]
    assert inputs.seq_lens.tolist() == [5, 3]
    assert inputs.cu_seqlens_q.tolist() == [0, 5, 8]
    assert inputs.logits_indices.tolist() == [4, 7]
    assert inputs.lora_slots.tolist() == [0] * 8  # no adapters
    assert [t.dtype for t in inputs.as_tuple()] == [torch.int64] * 3 + [torch.int32] * 3 + [torch.int64, torch.int32]

    scheduler.update(batch, [7, 9])
    decode, num_rows = runner.prepare(scheduler.schedule())
    assert num_rows == 2
    assert decode.input_ids.tolist() == [7, 9] and decode.positions.tolist() == [5, 3]
    assert decode.slot_mapping.tolist() == [slot(a, 5), slot(b, 3)]
    assert decode.seq_lens.tolist() == [6, 4] and decode.cu_seqlens_q.tolist() == [0, 1, 2]
    assert decode.logits_indices.tolist() == [0, 1]


class Copies:
    """Records every StepInputs host-to-device copy: (non_blocking, whether every source was pinned)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[tuple[bool, bool]] = []
        to, copy_to = StepInputs.to, StepInputs.copy_to

        def record(inputs: StepInputs, non_blocking: bool) -> None:
            self.seen.append((non_blocking, all(t.is_pinned() for t in inputs.as_tuple())))

        def spy_to(inputs: StepInputs, device: torch.device, non_blocking: bool = False) -> StepInputs:
            if inputs.input_ids.device != torch.device(device):
                record(inputs, non_blocking)
            return to(inputs, device, non_blocking)

        def spy_copy_to(inputs: StepInputs, buffers: StepInputs, non_blocking: bool = False) -> None:
            record(inputs, non_blocking)
            copy_to(inputs, buffers, non_blocking)

        monkeypatch.setattr(StepInputs, "to", spy_to)
        monkeypatch.setattr(StepInputs, "copy_to", spy_copy_to)


def capture_nothing(step, static, pool):
    """A capture that records no graph: replay leaves the static logits as the first run gave them."""
    return (lambda: None), step(static), pool


def run_prefill_and_decode(runner: ModelRunner) -> None:
    scheduler, _ = two_prompts()
    batch = scheduler.schedule()
    runner.execute(batch)
    scheduler.update(batch, [7, 9])
    runner.execute(scheduler.schedule())


def test_a_cpu_runner_passes_its_pageable_inputs_without_a_copy(monkeypatch):
    copies = Copies(monkeypatch)
    runner, graph = runner_on("cpu")
    scheduler, _ = two_prompts()
    inputs, _ = runner.prepare(scheduler.schedule())
    assert not any(t.is_pinned() for t in inputs.as_tuple())
    runner.run(inputs)
    assert all(graph.calls[0][name] is t for name, t in zip(INPUT_NAMES, inputs.as_tuple(), strict=True))
    runner.capture_decode_graphs((2,), scratch_block=15, capture=capture_nothing)
    run_prefill_and_decode(runner)
    assert copies.seen == [(False, False)]  # the decode step into the graph's buffers: a plain copy


@needs_gpu
def test_a_cuda_runner_copies_asynchronously_only_from_pinned_memory(monkeypatch):
    copies = Copies(monkeypatch)
    runner, graph = runner_on("cuda")
    scheduler, _ = two_prompts()
    inputs, _ = runner.prepare(scheduler.schedule())
    assert all(t.is_pinned() for t in inputs.as_tuple())
    runner.run(inputs)
    assert all(graph.calls[0][name].is_cuda for name in INPUT_NAMES)
    assert all(torch.equal(graph.calls[0][n].cpu(), t) for n, t in zip(INPUT_NAMES, inputs.as_tuple(), strict=True))
    runner.capture_decode_graphs((2,), scratch_block=15, capture=capture_nothing)
    copies.seen.clear()
    run_prefill_and_decode(runner)
    assert copies.seen == [(True, True)] * 2  # the prefill's inputs, then the decode step into the buffers
