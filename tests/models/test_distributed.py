"""Data-parallel training: two gloo processes make the same update as one on the full batch."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.nets.ncsnpp import build
from models.sde import VESDE
from models.training import TrainConfig, train

CFG = TrainConfig(steps=3, batch_size=4, warmup=1, lr=1e-3, loss_log_every=1)


def _setup():
    sde = VESDE(0.01, 5.0)
    torch.manual_seed(0)  # the same initial weights in every process
    net = build("tiny", sde.sigma)
    data = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    return sde, net, data


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        sde, net, data = _setup()
        res = train(net, sde, data, CFG)
        if rank == 0:
            torch.save({k: v.clone() for k, v in res.net.state_dict().items()}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process_full_batch(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    sde, net, data = _setup()
    single = train(net, sde, data, CFG).net.state_dict()
    ddp = torch.load(out, weights_only=True)
    worst = max(float((single[k] - ddp[k]).abs().max()) for k in single)
    assert worst < 1e-5, worst
    # And the weights moved: the comparison is not between two untouched initialisations.
    _, init, _ = _setup()
    moved = max(float((init.state_dict()[k] - ddp[k]).abs().max()) for k in single)
    assert moved > 1e-4
