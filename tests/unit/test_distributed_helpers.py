"""Distributed helpers: sharding that reproduces the global batch, exact checksums, and the
cross-rank mask check / peer-failure handling on a real 2-process gloo group (a few seconds)."""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback

import numpy as np
import pytest
import torch

from recipec import distributed as dist_utils


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [1, 2, 5, 15, 16, 33])
def test_shards_partition_the_global_batch(n, world):
    idx = np.random.default_rng(n * 10 + world).permutation(1000)[:n]
    parts = [dist_utils.shard_indices(idx, r, world) for r in range(world)]
    real = [p for p in parts if p[1] > 0]
    assert np.array_equal(np.concatenate([p[0] for p in real]), idx)  # union, in rank order
    assert sum(p[1] for p in parts) == pytest.approx(1.0)
    sizes = [len(p[0]) for p in real]
    assert max(sizes) - min(sizes) <= 1
    for local, weight in parts:
        assert len(local) >= 1  # every rank runs a forward pass, even with no share
        if weight == 0:
            assert n < world and np.array_equal(local, idx[:1])
    bounds = [dist_utils.shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_shard_arguments_are_checked():
    with pytest.raises(ValueError):
        dist_utils.shard_indices([], 0, 2)
    with pytest.raises(ValueError):
        dist_utils.shard_bounds(10, 2, 2)


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist_utils.world_size() == 1 and dist_utils.is_main() and not dist_utils.is_distributed()
    assert dist_utils.init_from_env("cpu") == "cpu" and not dist_utils.is_initialized()
    t = torch.tensor([1.0, 2.0])
    assert dist_utils.all_reduce_mean(t) is t and t.tolist() == [1.0, 2.0]
    assert dist_utils.broadcast_object({"a": 1}) == {"a": 1}
    assert dist_utils.all_gather_object(3) == [3]
    model = torch.nn.Linear(2, 2)
    assert dist_utils.wrap_model(model, "cpu") is model
    dist_utils.verify_identical({"w": torch.ones(2, dtype=torch.bool)}, None, "here")
    dist_utils.barrier()


def test_incomplete_launch_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(
        dist_utils.DistributedError, match="MASTER_ADDR and MASTER_PORT are not set"
    ):
        dist_utils.init_from_env("cpu")
    monkeypatch.setenv("RECIPEC_DIST_TIMEOUT", "soon")
    with pytest.raises(dist_utils.DistributedError, match="RECIPEC_DIST_TIMEOUT"):
        dist_utils.timeout_seconds()


def test_backend_follows_the_device(monkeypatch):
    monkeypatch.delenv("RECIPEC_DIST_BACKEND", raising=False)
    assert dist_utils.backend_for("cpu") == "gloo"
    assert dist_utils.backend_for("cuda:1") == "nccl"
    monkeypatch.setenv("RECIPEC_DIST_BACKEND", "gloo")
    assert dist_utils.backend_for("cuda") == "gloo"


def test_checksums_see_every_bit_and_position():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(64, 48, generator=g) > 0.5
    w = torch.randn(64, 48, generator=g)
    c = dist_utils.tensor_checksum(mask)
    assert dist_utils.tensor_checksum(mask.clone()) == c
    flipped = mask.clone()
    flipped[3, 7] = ~flipped[3, 7]
    assert dist_utils.tensor_checksum(flipped) != c
    flat = mask.reshape(-1)
    i = int(flat.nonzero()[0])
    j = int((~flat).nonzero()[0])
    swapped = flat.clone()
    swapped[i], swapped[j] = flat[j], flat[i]  # same count, moved
    assert dist_utils.tensor_checksum(swapped) != c
    cw = dist_utils.tensor_checksum(w)
    nudged = w.clone()
    nudged[10, 10] = torch.nextafter(nudged[10, 10], torch.tensor(1e9))  # one ulp
    assert dist_utils.tensor_checksum(nudged) != cw
    assert dist_utils.tensor_checksum(torch.tensor([0.0])) != dist_utils.tensor_checksum(
        torch.tensor([-0.0])
    )
    assert dist_utils.tensor_checksum(w.half()) == dist_utils.tensor_checksum(w.half().clone())
    table = dist_utils.mask_checksum({"b": mask, "a": flipped}, {"b": w})
    assert table.shape == (2, 2) and table.dtype == torch.int64
    assert (
        int(table[0, 0]) == dist_utils.tensor_checksum(flipped) and int(table[0, 1]) == 0
    )  # sorted by name
    assert int(table[1, 1]) == cw


def test_weighted_shard_gradients_sum_to_the_global_gradient(tiny_bert, embedded_tokenizer):
    """The loss weighting DDP relies on: sum_r w_r grad(mean loss_r) == grad(global mean loss),
    even with uneven shards and per-shard dynamic padding."""
    from recipec.tasks import load_task
    from recipec.tasks.data import make_dataloader

    task = load_task(None, None, max_train=15, max_eval=8, seed=0)
    loader = make_dataloader(
        task.train,
        embedded_tokenizer,
        task.info,
        batch_size=15,
        max_seq_length=32,
        shuffle=True,
        seed=1,
    )
    model = tiny_bert.eval()

    def grads(batch, weight=1.0):
        model.zero_grad(set_to_none=True)
        (model(**batch).loss * weight).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full = grads(next(iter(loader)))
    loader.set_epoch(0)
    for world in (2, 4):
        total = {n: torch.zeros_like(g) for n, g in full.items()}
        for r in range(world):
            loader.set_epoch(0)
            shard = next(dist_utils.sharded_batches(loader, r, world))
            assert shard["input_ids"].shape[0] in (15 // world, 15 // world + 1)
            for n, g in grads(shard, shard.weight).items():
                total[n] += g
        for n in full:
            assert torch.allclose(total[n], full[n], atol=1e-6, rtol=1e-4), (world, n)
    loader.set_epoch(0)
    same = [dict(b) for b in dist_utils.sharded_batches(loader, 0, 1)]
    loader.set_epoch(0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(same, loader))


# --------------------------------------------------------------------------------------------
# A real 2-rank gloo group (spawned processes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RECIPEC_DIST_TIMEOUT="60",
    )
    try:
        import torch as t

        from recipec import distributed as d

        with d.process_group("cpu") as device:
            result: dict = {"device": device, "world": d.world_size(), "main": d.is_main()}
            x = t.tensor([float(rank + 1)])
            result["mean"] = float(d.all_reduce_mean(x)[0])
            result["gathered"] = d.all_gather_object(rank * 10)
            result["broadcast"] = d.broadcast_object("from rank 0" if rank == 0 else "lost")
            masks = {"w": t.arange(12).reshape(3, 4) % 3 == 0}
            weights = {"w": t.linspace(0, 1, 12).reshape(3, 4)}
            d.verify_identical(masks, weights, "identical")
            result["identical"] = "ok"
            if rank == 1:
                masks["w"][2, 3] = ~masks["w"][2, 3]
            try:
                d.verify_identical(masks, weights, "after pruning")
                result["mismatch"] = "not detected"
            except d.RankMismatchError as exc:
                result["mismatch"] = str(exc)
            if rank == 1:  # then dies without a word
                queue.put((rank, result))
                queue.close()
                queue.join_thread()
                os._exit(0)
            try:
                d.all_reduce_sum(t.ones(2), what="a step")
                result["peer"] = "no error"
            except d.DistributedError as exc:
                result["peer"] = str(exc)
        queue.put((rank, result))
    except BaseException:  # noqa: BLE001 - report anything to the parent
        queue.put((rank, {"error": traceback.format_exc()}))


def test_two_gloo_ranks_check_masks_and_survive_a_dead_peer():
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, result = queue.get(timeout=180)
            results[rank] = result
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank, res in results.items():
        assert "error" not in res, f"rank {rank}:\n{res['error']}"
        assert res["world"] == 2 and res["main"] == (rank == 0) and res["device"] == "cpu"
        assert res["mean"] == 1.5
        assert res["gathered"] == [0, 10] and res["broadcast"] == "from rank 0"
        assert res["identical"] == "ok"
        # Both ranks stop, with the tensor and the ranks named.
        assert "after pruning: rank 0 and rank 1 hold different masks for w" in res["mismatch"]
    # Rank 1 died: rank 0's next collective fails at once with a clear error instead of hanging.
    assert "rank 0: a step failed" in results[0]["peer"] and "--resume" in results[0]["peer"]
