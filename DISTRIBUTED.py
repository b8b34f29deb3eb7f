"""Where a training run computes, as one value built once (Run: rank, world, device, precision), and the model
the loop calls: DDP or FSDP2 under torchrun, torch.compile. Plain `python TRAIN.py` is one process, world 1,
and the collectives here do nothing."""
import contextlib
import dataclasses
import gc
import os

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.distributed.fsdp import fully_shard

from DEVICE import pick_device, pick_dtype
from REPORT import UserError


@dataclasses.dataclass(frozen=True)
class Run:
    """This process's part of the run. autocast does the math in `dtype` over fp32 weights; the scaler is a no-op
    unless fp16 (so the loop calls both without an `if`)."""
    rank: int = 0                                   # this process, 0 .. world - 1
    world: int = 1                                  # processes (torchrun --nproc_per_node)
    local_rank: int = 0                             # its GPU on this machine
    device: torch.device = torch.device("cpu")      # cuda:local_rank under torchrun; compare device.type
    dtype: torch.dtype = torch.float32              # autocast's precision
    autocast: contextlib.AbstractContextManager = contextlib.nullcontext()
    scaler: torch.amp.GradScaler = dataclasses.field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))

    @property
    def master(self):
        """Only rank 0 logs, writes metrics and checkpoints."""
        return self.rank == 0


def init(mcfg):
    """The Run from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK; none for a plain process) and
    model.device / model.dtype, as nanochat's compute_init: the process group first, then device and precision."""
    rank, world, local_rank = 0, 1, 0
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    device = pick_device(mcfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dtype = pick_dtype(mcfg.dtype, device, "train")
    return Run(rank, world, local_rank, device, dtype,
               torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32),
               torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


def check_fsdp(t, lora, run):
    if t.fsdp and lora.enabled:
        raise UserError("--fsdp with --lora is not supported - LoRA state is small: use plain torchrun (DDP)")
    if t.fsdp and t.grpo:
        raise UserError("--fsdp with --grpo is not supported - generating needs the whole model in each process: use "
                        "plain torchrun (DDP), with --lora where the model is large")
    if t.fsdp and run.world == 1:
        raise UserError("--fsdp shards the model over processes - launch with torchrun --nproc_per_node N TRAIN.py …")


def barrier(run):
    if run.world > 1:
        dist.barrier()


def rank0_first(run, fn):
    """fn() on rank 0, then on the others: rank 0 writes a cache (tokenizer, tokens) that the others then read."""
    result = fn() if run.rank == 0 else None
    barrier(run)
    return result if run.rank == 0 else fn()


def agreed_max(value, run):
    """The largest of every rank's value (collective); the value itself in one process."""
    if run.world == 1:
        return value
    flag = torch.tensor(value, device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag)


def shutdown():
    """End the process group, if any. DDP's reducer (and the gloo work it holds) is freed first: gloo threads
    that outlive the process group can abort the interpreter at exit (SIGABRT after a finished run, seen)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def wrap(scorer, t, run):
    """The module the loop calls, and the switch for gradient all-reduce: the LOSS.Scorer compiled, then FSDP (in
    place) or DDP. Checkpoints always save the model the scorer holds: not compiled, not wrapped."""
    # dynamic shapes: batches differ in length; where dynamo cannot compile (no C++ compiler, an unsupported
    # op) the run falls back to eager with a warning (TRAIN.py sets suppress_errors) and compile_report says so
    model = torch.compile(scorer, dynamic=True) if t.compile else scorer
    if t.fsdp:
        shard(scorer)  # parameters become DTensor shards
        return model, scorer.set_requires_gradient_sync
    if run.world == 1:
        return model, lambda on: None  # one process: nothing to all-reduce
    gpu = [run.local_rank] if run.device.type == "cuda" else None
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=gpu)
    return model, lambda on: setattr(model, "require_backward_grad_sync", on)


def shard(scorer):
    """FSDP2: shard every transformer block (the classes HF lists in _no_split_modules), then the rest, with the
    scorer as the root: its forward gathers the embeddings, final norm and head that it reads directly."""
    blocks = set(getattr(scorer.model, "_no_split_modules", None) or [])
    for module in scorer.model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    return fully_shard(scorer)


def compile_report():
    """What torch.compile did in this process: graphs compiled and graph breaks, from dynamo's counters."""
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    if not graphs:
        return "torch.compile compiled nothing: the run was eager (see the warning above)"
    return f"torch.compile: {graphs} graphs compiled, {breaks} graph breaks"
