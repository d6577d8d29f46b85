"""Where this process runs in a `torchrun` launch, and how ranks agree (rank 0 plans, others follow)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

from pfgen.config import Config, with_overrides
from pfgen.errors import PfgenError

WAIT = timedelta(hours=24)  # ranks wait at the last barrier for the slowest one's last video


class Ranks:
    """This process's place in a `torchrun` launch (rank 0 of 1 without one)."""

    def __init__(self, rank: int = 0, world: int = 1, local_cuda: int | None = None):
        self.rank, self.world, self.local_cuda = rank, world, local_cuda

    def place(self, cfg: Config) -> Config:
        """One GPU per rank: cuda:LOCAL_RANK unless the user pinned a device."""
        if self.local_cuda is None or cfg.runtime.device not in ("auto", "cuda"):
            return cfg
        return with_overrides(cfg, runtime=dict(device=f"cuda:{self.local_cuda}"))

    def share(self, make):
        """Run `make` on rank 0 and hand its result to every rank; its PfgenError stops all of them."""
        if self.world == 1:
            return make()
        import torch.distributed as dist

        box = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", make())
            except PfgenError as exc:
                box[0] = ("error", exc)
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "ok":
            return value
        if self.rank == 0:
            raise value
        # Rank 0 alone prints the error and fails the launch: were this rank to fail too, torchrun could stop
        # rank 0 before its message is out.
        raise SystemExit(0)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


@contextmanager
def distributed():
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1): nccl on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Ranks()
        return
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda and local >= torch.cuda.device_count():
        raise PfgenError(f"local rank {local} has no GPU of its own ({torch.cuda.device_count()} visible)",
                         "use --nproc_per_node at most the number of GPUs")
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=WAIT,
                            device_id=torch.device("cuda", local) if cuda else None)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), local if cuda else None)
    finally:
        dist.destroy_process_group()
