"""Several processes and the model the loop calls: torchrun's environment, barriers, DDP or FSDP2, and
torch.compile. Plain `python TRAIN.py` is one process and none of this changes anything."""
import gc
import os

from CONFIG import UserError


def init_distributed():
    """(rank, world_size, local_rank) from the environment torchrun sets; (0, 1, 0) for plain `python TRAIN.py`."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    import torch
    import torch.distributed as dist
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def check_fsdp(fsdp, lora, world):
    if fsdp and lora:
        raise UserError("--fsdp with --lora is not supported - LoRA state is small: use plain torchrun (DDP)")
    if fsdp and world == 1:
        raise UserError("--fsdp shards the model over processes - launch with torchrun --nproc_per_node N TRAIN.py …")


def barrier(world):
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def agreed_max(value, world, device):
    """The largest of every rank's value (collective); the value itself in one process."""
    if world == 1:
        return value
    import torch
    import torch.distributed as dist
    flag = torch.tensor(value, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag)


def shutdown():
    """End the process group, if any. DDP's reducer (and the gloo work it holds) is freed first: gloo threads
    that outlive the process group can abort the interpreter at exit (SIGABRT after a finished run, seen)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def wrap(raw_model, t, world, local_rank, device):
    """The model the loop calls, and the switch for gradient all-reduce: gradient checkpointing, compile,
    then FSDP (in place) or DDP. Checkpoints always save raw_model: not compiled, not wrapped."""
    import torch
    if t.grad_checkpointing:
        raw_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = compile_model(raw_model) if t.compile else raw_model
    if t.fsdp:
        shard(raw_model)  # parameters become DTensor shards
        return model, raw_model.set_requires_gradient_sync
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if "cuda" in device else None)
    return model, lambda on: setattr(model, "require_backward_grad_sync", on)


def shard(model):
    """FSDP2: shard every transformer block (the classes HF lists in _no_split_modules), then the rest."""
    from torch.distributed.fsdp import fully_shard
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    return fully_shard(model)


def compile_model(model):
    """torch.compile; where it cannot compile (no C++ compiler, an unsupported op) dynamo falls back to eager
    with a warning instead of failing the run (compile_report says which happened)."""
    import torch
    import torch._dynamo
    torch._dynamo.config.suppress_errors = True
    return torch.compile(model, dynamic=True)


def compile_report():
    """What torch.compile did in this process: graphs compiled and graph breaks, from dynamo's counters."""
    from torch._dynamo.utils import counters
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    if not graphs:
        return "torch.compile compiled nothing: the run was eager (see the warning above)"
    return f"torch.compile: {graphs} graphs compiled, {breaks} graph breaks"
