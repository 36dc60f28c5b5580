"""Distributed helpers: identity in one process; a real 2-process gloo group checks gather and reductions.

The 2-process test launches two plain Python processes with torchrun's environment variables (RANK,
WORLD_SIZE, MASTER_ADDR, ...), so it does not depend on how pytest names this test module.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dusss import distributed
from dusss.engine.logging import read_metrics
from dusss.engine.runs import read_run
from dusss.testing import run_ranks


def test_single_process_helpers_are_identities() -> None:
    lin = torch.nn.Linear(2, 1)
    assert distributed.wrap_ddp(lin, torch.device("cpu")) is lin  # no process group: no wrapper, no collectives
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_with_grad(x) is x
    assert distributed.all_reduce_mean(x) is x
    assert distributed.all_reduce_sum(x) is x
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert not distributed.is_distributed()
    assert not distributed.init_from_env("cpu")  # WORLD_SIZE unset: nothing to initialise
    distributed.barrier()


def test_launch_env_reads_torchrun_then_slurm() -> None:
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "7",
                "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}
    assert distributed.launch_env(torchrun) == {k: torchrun[k] for k in distributed.LAUNCH_KEYS}  # torchrun wins
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.2"}
    assert distributed.launch_env(slurm) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                             "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29500"}
    assert distributed.launch_env({**slurm, "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})["MASTER_ADDR"] == "n1"
    assert distributed.launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == {}  # one task: one process
    assert distributed.launch_env({}) == {}


WORKER = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    from dusss import distributed
    from dusss.engine.logging import MetricsLogger
    from dusss.engine.runs import prepare_run_dir
    from dusss.engine.samplers import EpochSampler
    from dusss.errors import DusssError

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    assert distributed.init_from_env("cpu")
    rank, world = distributed.rank(), distributed.world_size()
    res = {"rank": rank, "world": world, "main": distributed.is_main()}
    try:
        # rank r contributes 2 rows filled with r+1
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        g = distributed.gather_with_grad(x)
        res["gathered"] = g.detach()[:, 0].tolist()
        weights = torch.arange(g.numel(), dtype=torch.float32).reshape(g.shape)
        (g * weights).sum().backward()
        # every rank computed the same loss: the local slice receives the sum over ranks of its gradient
        res["grad_is_summed_local_slice"] = torch.equal(x.grad, 2 * weights[2 * rank: 2 * rank + 2])
        # DDP: rank 0's weights at wrap time; no_sync keeps a micro-step's gradient local; the last micro-step
        # (two forwards, one backward, as the methods' labeled + unlabeled passes) averages the accumulated sum
        lin = torch.nn.Linear(3, 1, bias=False)
        torch.nn.init.constant_(lin.weight, float(rank + 5))
        ddp = distributed.wrap_ddp(lin, torch.device("cpu"))
        res["ddp"] = isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        res["wrapped_weight"] = lin.weight.flatten().tolist()
        x1 = torch.full((2, 3), float(rank + 1))
        with distributed.no_sync_unless(ddp, False):
            ddp(x1).sum().backward()
        res["local_grad"] = lin.weight.grad.flatten().tolist()
        with distributed.no_sync_unless(ddp, True):
            (ddp(x1).sum() + ddp(2 * x1).sum()).backward()
        res["synced_grad"] = lin.weight.grad.flatten().tolist()
        res["mean"] = distributed.all_reduce_mean(torch.tensor([float(rank)])).item()
        res["sum"] = distributed.all_reduce_sum(torch.tensor([float(rank + 1)])).item()
        # rank-aware infrastructure: rank 0 writes the run folder, every rank takes the same guard decision
        run = prepare_run_dir(out / "run", {"a": 1}, kind="train")
        try:
            prepare_run_dir(run, {"a": 2}, kind="train")
            res["guard"] = False
        except DusssError:
            res["guard"] = True
        MetricsLogger(run, tensorboard=False).log(1, {"loss": float(rank)})
        res["share"] = list(EpochSampler(8, seed=0))
        distributed.barrier()
    finally:
        distributed.cleanup()
    (out / f"rank{rank}.json").write_text(json.dumps(res))
''')


@pytest.mark.timeout(150)
def test_two_process_gloo_gather_and_reduce(tmp_path: Path) -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    results = run_ranks(script, [tmp_path], timeout=120)
    assert [code for code, _ in results] == [0, 0], "\n".join(log for _, log in results)[-3000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in range(2):
        assert res[r]["rank"] == r and res[r]["world"] == 2 and res[r]["main"] == (r == 0)
        assert res[r]["gathered"] == [1.0, 1.0, 2.0, 2.0]  # concatenated in rank order
        assert res[r]["grad_is_summed_local_slice"]
        assert res[r]["ddp"] and res[r]["wrapped_weight"] == [5.0] * 3
        assert res[r]["local_grad"] == [2.0 * (r + 1)] * 3  # 2 rows of r+1, not averaged
        assert res[r]["synced_grad"] == [12.0] * 3  # mean over ranks of 2(r+1) + 2(r+1) + 4(r+1)
        assert res[r]["mean"] == pytest.approx(0.5) and res[r]["sum"] == pytest.approx(3.0)
        assert res[r]["guard"]  # a different config is refused on every rank
    record = read_run(tmp_path / "run")
    assert record is not None and len(record["history"]) == 1  # written once, by rank 0
    assert [row["loss"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [0.0]  # rank 0 only
    shares = [set(r["share"]) for r in res]  # sampler defaults come from the process group
    assert len(shares[0]) == len(shares[1]) == 4 and shares[0] | shares[1] == set(range(8))
