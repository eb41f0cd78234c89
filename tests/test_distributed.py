"""Distributed estimation (SPEC §6): 2 processes, gloo on loopback, against the single-process run in float64.

One module-scoped spawn runs every distributed scenario (uneven shards, a rank
without samples of a class, a rank without any batch, per-class files, a padded
DistributedSampler); each test then checks one result against its oracle.
"""
from __future__ import annotations

import datetime
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from untangle_ext import SignalEstimator, SignalStore, distributed
from untangle_ext.compat import _CheckedLoader
from untangle_ext.moments import VEC_FIELDS, Moments
from untangle_ext.store import class_store_path
from untangle_ext.trace import Program

WORLD = 2
CLASSES = 3
BATCH_SIZES = (6, 5, 7, 4, 6, 3, 6)  # 7 batches: rank 0 gets 4, rank 1 gets 3 (uneven)
PER_CLASS_BATCHES = {0: 5, 1: 2, 2: 1}  # class 2 has one batch, so rank 1 has none of it


def make_model() -> nn.Module:
    """Float64 conv net with padding, a grouped conv, max-pool and two dense layers (biases non-zero)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, CLASSES),
    ).double().eval()


def make_batches(sizes=BATCH_SIZES, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of large-mean float64 images; class 2 occurs only in the first batch (rank 0's)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        x = 40.0 + 3.0 * torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 2, (n,), generator=g)
        if i == 0:
            labels[:2] = 2
        out.append((x, labels))
    return out


def class_batches(c: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    sizes = tuple(3 + (i + c) % 3 for i in range(PER_CLASS_BATCHES[c]))
    return [(x, torch.full_like(y, c)) for x, y in make_batches(sizes, seed=10 + c)]


def dataset() -> TensorDataset:
    batches = make_batches()
    return TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))


def accumulate(program: Program, batches) -> Moments:
    """Moments of ``batches`` by class (3 slots), as the estimator accumulates them."""
    moments = Moments(program, CLASSES)
    for x, labels in batches:
        moments.update(x, labels)
    return moments


def moments_state(moments: Moments) -> dict:
    return {"images": moments.images.clone(),
            **{name: {"mat": lm.mat.clone(), "vec": lm.vec.clone(), "shift": lm.shift.clone()}
               for name, lm in moments.layers.items()}}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    out_dir, result = Path(out), {}
    model = make_model()
    program = Program(model)
    try:
        moments = accumulate(program, distributed.shard_batches(make_batches()))
        distributed.all_reduce_moments(moments)
        result["moments"] = moments_state(moments)

        own = distributed.Presharded(make_batches()[rank::WORLD])  # sharded by the caller: used as is
        presharded = accumulate(program, distributed.shard_batches(own))
        distributed.all_reduce_moments(presharded)
        result["presharded"] = moments_state(presharded)

        with distributed.disabled():  # each rank alone, on a different number of batches
            result["local"] = _estimator(model).fit(make_batches()[:1 + 2 * rank])

        lone = accumulate(program, distributed.shard_batches(make_batches()[:1]))  # rank 1 sees no batch
        distributed.all_reduce_moments(lone)
        result["lone"] = moments_state(lone)

        loader = DataLoader(dataset(), batch_size=5, sampler=distributed.ShardSampler(dataset()))
        result["fit"] = {c: s.to_dict() for c, s in _estimator(model).fit(loader).items()}

        saves = []
        if rank != 0:
            original = SignalStore.save
            SignalStore.save = lambda self, *a, **k: saves.append(a) or original(self, *a, **k)
        est = _estimator(model)
        result["written"] = est.fit_to_files(out_dir / "dist", class_batches)
        result["resumed"] = est.fit_to_files(out_dir / "dist", _no_loader)
        result["saves_on_this_rank"] = len(saves)

        sharded = DataLoader(dataset(), batch_size=5, sampler=distributed.ShardSampler(dataset()))
        wrapped = _CheckedLoader(sharded, None, 0)  # estimate_signals' wrapper keeps the sharding visible
        result["wrapped_kept"] = distributed.shard_batches(wrapped) is wrapped

        padded = DataLoader(dataset(), batch_size=5, sampler=DistributedSampler(dataset(), shuffle=False))
        try:
            _estimator(model).fit(padded)
        except ValueError as exc:
            result["padded_error"] = str(exc)
    finally:
        torch.save(result, out_dir / f"rank{rank}.pt")
        dist.destroy_process_group()


def _estimator(model: nn.Module) -> SignalEstimator:
    return SignalEstimator(model, store_dtype=torch.float64, progress=False)


def _no_loader(c: int):
    raise AssertionError(f"class {c} was estimated again although its store is current")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    """Run the scenarios on 2 gloo ranks; return each rank's results and the output folder."""
    out = tmp_path_factory.mktemp("dist")
    ctx = mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process run did not finish in 120 s (a collective hung?)")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], out


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| within each row of the last dim (so entries near zero cannot inflate it)."""
    scale = b.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(b.dtype).tiny)
    return ((a - b).abs() / scale).max().item()


def vec_rows(vec: torch.Tensor) -> torch.Tensor:
    """``vec`` (S, F·K+1) as rows of one field each, the count padded into a row of its own."""
    fields = vec[:, :-1].unflatten(1, (len(VEC_FIELDS), -1))
    count = torch.nn.functional.pad(vec[:, -1:], (0, fields.shape[-1] - 1)).unsqueeze(1)
    return torch.cat([fields, count], dim=1)


def compare_moments(state: dict, reference: Moments) -> float:
    """Re-shift the single-process ``reference`` onto the distributed shifts; the worst relative difference."""
    assert torch.equal(state["images"], reference.images)
    worst = 0.0
    for name, lm in reference.layers.items():
        distributed.reshift(lm, state[name]["shift"])
        mine = state[name]
        worst = max(worst, max_rel_diff(mine["mat"], lm.mat), max_rel_diff(vec_rows(mine["vec"]), vec_rows(lm.vec)))
    return worst


def test_reshift_equals_accumulating_about_the_new_shift():
    """The exact re-shift oracle: accumulate about s1 then re-shift to s2 == accumulate about s2 (float64)."""
    program = Program(make_model())
    about_s1 = accumulate(program, make_batches())
    about_s2 = Moments(program, CLASSES)
    for lm in about_s2.layers.values():
        s1 = about_s1.layers[lm.layer.name].shift
        lm.set_shift(s1 + torch.linspace(-2.0, 3.0, s1.numel(), dtype=s1.dtype))
    for x, labels in make_batches():
        about_s2.update(x, labels)
    assert compare_moments(moments_state(about_s2), about_s1) <= 1e-12


def test_all_reduced_moments_equal_single_process(ranks):
    results, _ = ranks
    reference = accumulate(Program(make_model()), make_batches())
    assert compare_moments(results[0]["moments"], reference) <= 1e-12
    for name in reference.layers:  # every rank holds the same sums after the all-reduce, bit for bit
        assert torch.equal(results[0]["moments"][name]["mat"], results[1]["moments"][name]["mat"])


def test_presharded_batches_are_used_as_they_are(ranks):
    results, _ = ranks
    reference = accumulate(Program(make_model()), make_batches())
    assert compare_moments(results[1]["presharded"], reference) <= 1e-12


def test_disabled_estimates_each_rank_alone(ranks):
    results, _ = ranks
    for rank, result in enumerate(results):
        want = _estimator(make_model()).fit(make_batches()[:1 + 2 * rank])
        assert {c: s.num_samples for c, s in result["local"].items()} == {c: s.num_samples for c, s in want.items()}
    assert results[0]["local"][0].num_samples != results[1]["local"][0].num_samples


def test_rank_without_any_batch_contributes_nothing(ranks):
    results, _ = ranks
    reference = accumulate(Program(make_model()), make_batches()[:1])
    assert compare_moments(results[1]["lone"], reference) <= 1e-12


def _assert_same_store(got: dict, want: dict) -> None:
    assert {k: v for k, v in got.items() if k != "patterns"} == {k: v for k, v in want.items() if k != "patterns"}
    assert got["patterns"].keys() == want["patterns"].keys()
    for layer, p in want["patterns"].items():
        for key, t in p.items():
            assert torch.allclose(got["patterns"][layer][key], t, rtol=1e-10, atol=1e-12), (layer, key)
            if key.startswith("n"):
                assert torch.equal(got["patterns"][layer][key], t)


def test_fit_with_shard_sampler_equals_single_process(ranks):
    results, _ = ranks
    loader = DataLoader(dataset(), batch_size=5)
    want = {c: s.to_dict() for c, s in _estimator(make_model()).fit(loader).items()}
    for result in results:
        assert result["fit"].keys() == want.keys() == set(range(CLASSES))
        for c in want:
            _assert_same_store(result["fit"][c], want[c])


def test_per_class_files_written_by_rank0_equal_single_process(ranks, tmp_path):
    results, out = ranks
    _estimator(make_model()).fit_to_files(tmp_path / "single", class_batches)
    for c in range(CLASSES):
        got = torch.load(class_store_path(out / "dist", c), weights_only=True)
        _assert_same_store(got, torch.load(class_store_path(tmp_path / "single", c), weights_only=True))
    assert results[1]["saves_on_this_rank"] == 0
    for result in results:
        assert result["written"] == result["resumed"] == {c: class_store_path(out / "dist", c) for c in range(3)}


def test_estimate_signals_loader_wrapper_keeps_shard_sampler(ranks):
    results, _ = ranks
    assert results[0]["wrapped_kept"] and results[1]["wrapped_kept"]


def test_padded_distributed_sampler_is_refused(ranks):
    results, _ = ranks
    for result in results:
        assert "repeats samples" in result["padded_error"] and "ShardSampler" in result["padded_error"]


def test_shard_sampler_splits_without_padding():
    shards = [list(distributed.ShardSampler(range(7), num_replicas=3, rank=r)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(distributed.ShardSampler(range(7), num_replicas=3, rank=r)) for r in range(3)] == [3, 2, 2]


def test_single_process_is_untouched():
    """Without a process group every helper is a no-op."""
    batches = make_batches()
    assert distributed.current() is None and distributed.is_main()
    assert distributed.shard_batches(batches) is batches
    assert list(distributed.ShardSampler(range(5))) == [0, 1, 2, 3, 4]
    with distributed.disabled():
        assert distributed.current() is None
