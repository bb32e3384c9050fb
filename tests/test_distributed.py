"""DistributedDataParallel: 2 CPU processes (gloo) reproduce single-process gradients on the whole batch."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from learned_inference import DecoderModel, IterativeInferenceOptimizer, ModelWithInference
from tests.conftest import mlp_decoder

D, X, B, T = 3, 10, 8, 4
WORLD = 2
# feed-forward (per-step gradients injected in backward) and recurrent (backpropagation through the steps)
NETWORKS = ("highway", "gru")
ITERATIONS = 2  # the second backward fails under DDP if the first left a gradient unreduced


def _build(network: str) -> tuple[ModelWithInference, torch.Tensor, torch.Tensor]:
    """The same float64 model, optimizer, batch and noise in every process."""
    model = DecoderModel(mlp_decoder(D, X, seed=0), likelihood="bernoulli", latent_dim=D)
    torch.manual_seed(1)
    inference = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=T, hidden_size=16, network=network)
    generator = torch.Generator().manual_seed(2)
    x = torch.bernoulli(torch.full((B, X), 0.4, dtype=torch.float64), generator=generator)
    noise = torch.randn(T + 1, 2, B, D, dtype=torch.float64, generator=generator)
    return ModelWithInference(inference.double(), example_input=x), x, noise


def _train(module: torch.nn.Module, parameters: list[torch.nn.Parameter], x, noise) -> None:
    """ITERATIONS steps of SGD; leaves the last step's gradients in ``.grad``."""
    optim = torch.optim.SGD(parameters, lr=0.1)
    for _ in range(ITERATIONS):
        optim.zero_grad()
        module(x, noise=noise).loss.backward()
        optim.step()


def _run(rank: int, rendezvous: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        shard = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        for network in NETWORKS:
            joint, x, noise = _build(network)
            ddp = DistributedDataParallel(joint)
            reductions = [0]

            def counting_allreduce(_state, bucket, reductions=reductions):
                reductions[0] += 1
                work = dist.all_reduce(bucket.buffer().div_(WORLD), async_op=True)
                return work.get_future().then(lambda fut: fut.value()[0])

            ddp.register_comm_hook(None, counting_allreduce)
            _train(ddp, list(ddp.parameters()), x[shard], noise[:, :, shard])
            grads = {name: p.grad for name, p in joint.named_parameters()}
            torch.save({"grads": grads, "reductions": reductions[0]}, f"{out_dir}/{network}-{rank}.pt")
        # Both ranks finish their collectives before either tears gloo down.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _worker(rank: int, run: Callable[..., None], *args: object) -> None:
    """Runs ``run(rank, *args)``; on success ends the process at once, skipping interpreter finalization.

    DDP's lazy ``torch._dynamo`` import keeps references to the default group, so ``destroy_process_group()`` leaves
    gloo's worker threads alive, and the last all-reduce's comm-hook future can be released on one of them while
    the interpreter finalizes: ``terminate called without an active exception`` (SIGABRT) in about 5% of runs
    (pytorch#190489). Everything this worker produces is on disk (``torch.save`` closes its files) and its streams
    are flushed first, so ``os._exit(0)`` loses nothing. A failure raises out of ``run`` instead, and ``mp.spawn``
    reports it with its traceback as before (see the last test).
    """
    run(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Runs the 2-process training once for all tests here: {network: [rank 0 result, rank 1 result]}."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_run, str(out / "rendezvous"), str(out)), nprocs=WORLD, join=True)
    return {n: [torch.load(out / f"{n}-{r}.pt") for r in range(WORLD)] for n in NETWORKS}


@pytest.mark.parametrize("network", NETWORKS)
def test_ddp_gradients_equal_single_process_gradients_on_the_concatenated_batch(ddp_results, network):
    joint, x, noise = _build(network)
    _train(joint, list(joint.parameters()), x, noise)
    names = [name for name, _ in joint.named_parameters()]
    assert any(n.startswith("model.") for n in names) and any(n.startswith("inference.") for n in names)
    for rank in range(WORLD):
        ours = ddp_results[network][rank]["grads"]
        assert sorted(ours) == sorted(names)
        for name, p in joint.named_parameters():
            assert p.grad.abs().max() > 0, name  # a zero gradient would make the comparison vacuous
            torch.testing.assert_close(ours[name], p.grad, rtol=0, atol=1e-6, msg=f"rank {rank}: {name}")


def test_ddp_gradients_differ_from_one_shard_alone(ddp_results):
    """The check above can fail: one process's shard alone gives different gradients."""
    joint, x, noise = _build("highway")
    _train(joint, list(joint.parameters()), x[: B // WORLD], noise[:, :, : B // WORLD])
    synced = ddp_results["highway"][0]["grads"]
    assert max((synced[n] - p.grad).abs().max().item() for n, p in joint.named_parameters()) > 1e-4


@pytest.mark.parametrize("network", NETWORKS)
def test_distributed_refinement_loop_adds_no_reductions(ddp_results, network):
    """One bucketed all-reduce per backward (the model is far below one bucket), whatever num_steps is."""
    assert [r["reductions"] for r in ddp_results[network]] == [ITERATIONS] * WORLD


def test_model_with_inference_registers_model_and_update_network():
    joint, _, _ = _build("highway")
    assert joint.is_sized
    own = {id(p) for p in joint.parameters()}
    assert {id(p) for p in joint.model.parameters()} | {id(p) for p in joint.inference.parameters()} == own
    lazy = ModelWithInference(
        IterativeInferenceOptimizer(joint.model, latent_dim=D, num_steps=1, hidden_size=4)
    )
    assert not lazy.is_sized
    with pytest.raises(TypeError, match="inference must be an IterativeInferenceOptimizer"):
        ModelWithInference(joint.model)  # type: ignore[arg-type]


def _fail(rank: int) -> None:
    raise RuntimeError(f"rank {rank} failed on purpose")


def test_a_failing_worker_still_fails_the_run():
    """os._exit(0) ends successful workers only: an exception still reaches the parent with its message."""
    with pytest.raises(mp.ProcessRaisedException, match="rank 0 failed on purpose"):
        mp.spawn(_worker, args=(_fail,), nprocs=1, join=True)
