"""Several processes under torchrun: process group, DDP/FSDP2 wrapping, gathering, and the shards of a sweep."""
import atexit
import os
import sys

import torch
import torch.distributed as dist

from runtime.io import DataError, read_jsonl, write_jsonl


# ----------------------------------------------------------------------------- several processes (torchrun)
# `python stage.py ...` runs one process; `torchrun --nproc_per_node=N stage.py ...` runs the same script N times.
# Training stages split each optimizer step's micro-batches over the ranks (data parallel: DDP, or FSDP2 for models
# that do not fit one device); sample.py and score.py deal their batches to the ranks (or to the jobs of a job array
# with --shard i/N) and merge the records back into single-process order.
def dist_setup(device="auto"):
    """Join the process group when torchrun started this process (WORLD_SIZE > 1): nccl and this rank's own GPU
    (LOCAL_RANK) on CUDA, gloo on CPU; ranks > 0 print nothing (stdout → /dev/null), so every log line is rank 0's.
    → (rank, world size, device). A plain `python script.py` gets (0, 1, device) and nothing else happens."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(dist.destroy_process_group)
        if dist.get_rank() > 0:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (stays open for the life of the process)
    return dist.get_rank(), dist.get_world_size(), device


def rank_world():
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main():
    """True on the process that writes outputs and prints: rank 0, or the only process."""
    return rank_world()[0] == 0


def shard(items, i, n):
    """Every n-th item from the i-th: shard i of n. Neighbouring items (length-sorted batches) go to different
    shards, so the shards get about the same work. i = None (a --merge run) owns nothing."""
    return [] if i is None else list(items)[i::n]


def all_sum(values, mean=False):
    """A number or a dict of numbers summed (mean=True: averaged) over the ranks, e.g. the loss of the whole global
    batch or every rank's token count. Collective: every rank calls it. Unchanged in a single process."""
    world = rank_world()[1]
    if world == 1:
        return values
    keys = list(values) if isinstance(values, dict) else None
    t = torch.tensor([float(values[k]) for k in keys] if keys else [float(values)], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    t = (t / world if mean else t).tolist()
    return dict(zip(keys, t)) if keys else t[0]


def all_mean(values):
    """all_sum(values, mean=True): for logging the loss and metrics of the global batch."""
    return all_sum(values, mean=True)


def all_max(value):
    """The largest of every rank's number (collective: every rank calls it). Unchanged in a single process."""
    if rank_world()[1] == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def barrier():
    """Wait until every rank gets here (no-op in a single process)."""
    if rank_world()[1] > 1:
        dist.barrier()


def all_gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object); [obj] in a single process."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


class _Forward(torch.nn.Module):
    """forward(*inputs) = fn(model, *inputs). The stages call submodules (model.model, model.lm_head, model.score),
    not model.forward; DDP and FSDP2 hook into the forward of the module they wrap, so they wrap this one."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *inputs):
        return self.fn(self.model, *inputs)


def parallelize(model, fn, fsdp=False, compile=False, dtype=torch.float32):
    """The training forward fn(model, *inputs) as a module, ready for data-parallel training under torchrun:
      DDP (default)  every rank holds the whole model; gradients are all-reduced (averaged) during backward.
      fsdp=True      FSDP2: fully_shard per decoder layer, then the rest (embeddings, norm, heads): each rank keeps
                     1/world of the fp32 parameters, gradients and AdamW states, and gathers one layer at a time
                     (in `dtype`, gradients reduced in fp32): for models whose training state does not fit one device.
      compile=True   torch.compile each decoder layer (same parameter names, so checkpoints do not change).
    A single process gets the plain module. The model keeps its parameter names: save_model writes a normal folder."""
    if compile:
        for layer in model.model.layers:
            layer.forward = torch.compile(layer.forward)
    call = _Forward(model, fn)
    if rank_world()[1] == 1:
        return call
    dev = next(model.parameters()).device
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(dev.type, (rank_world()[1],))
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        # the root reshards after forward too: between steps (and after no-grad passes such as DPO's reference
        # pass) model.parameters() are the sharded parameters, the ones the optimizer must hold
        return fully_shard(call, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(call, device_ids=[dev.index] if dev.type == "cuda" else None)


def grad_sync(wrapped, sync):
    """Gradient accumulation: call before each micro-batch; sync=True on the last one of a step, whose backward
    reduces the summed gradients across ranks once (DDP: the switch its no_sync() context flips; FSDP2:
    set_requires_gradient_sync, which keeps unsharded fp32 gradients until then). No-op in a single process."""
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(sync)
    elif hasattr(wrapped, "require_backward_grad_sync"):
        wrapped.require_backward_grad_sync = sync


def save_model(model, tok, out):
    """Every rank calls this (gathering FSDP2 shards is collective); rank 0 writes one plain save_pretrained folder
    (+ tokenizer) that loads without torch.distributed, whatever the sharding was."""
    from torch.distributed.tensor import DTensor
    state = None
    if any(isinstance(p, DTensor) for p in model.parameters()):
        state, full = {}, {}
        for k, v in model.state_dict(keep_vars=True).items():
            if id(v) not in full:  # tied weights (embeddings = LM head) are one tensor: gather it once
                t = v.detach().full_tensor()  # (collective) the whole tensor on every rank, one at a time
                full[id(v)] = t.cpu() if is_main() else None
            state[k] = full[id(v)]
    if is_main():
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out, state_dict=state)
        tok.save_pretrained(out)


def shard_spec(spec="", merge=0):
    """Which part of a sweep (sample.py, score.py) this process does → (i, n, how):
      --shard i/N     one job of a job array across machines, no torch.distributed: writes OUT.part-i-of-N
      --merge N       owns nothing: merges OUT.part-*-of-N (made with the same flags) into OUT
      torchrun        rank i of n; rank 0 gathers the records and writes OUT
      otherwise       (0, 1, 'all')"""
    rank, world = rank_world()
    if spec and merge:
        raise SystemExit("error: --shard runs one part and --merge joins the parts: give one of them")
    if (spec or merge) and world > 1:
        raise SystemExit("error: --shard/--merge are for separate jobs; under torchrun the ranks shard themselves")
    if merge:
        if merge < 1:
            raise SystemExit(f"error: --merge needs the number of parts N >= 1, got {merge}")
        return None, merge, "merge"
    if spec:
        try:
            i, n = (int(x) for x in spec.split("/"))
        except ValueError:
            raise SystemExit(f"error: --shard takes i/N (e.g. 0/4), got {spec!r}") from None
        if not 0 <= i < n:
            raise SystemExit(f"error: --shard {spec}: need 0 <= i < N")
        return i, n, "job"
    return (rank, world, "torchrun") if world > 1 else (0, 1, "all")


def part_path(out, i, n):
    return f"{out}.part-{i}-of-{n}"


def drop_logs(out, partial, part):
    """The end of a sweep, once OUT is written: every process deletes its own log (partial) and a --merge run the parts
    it joined. Under torchrun the ranks wait for each other first, so no log goes before OUT exists."""
    barrier()
    if os.path.exists(partial):
        os.remove(partial)
    if part[2] == "merge":
        for i in range(part[1]):
            os.remove(part_path(out, i, part[1]))


def collect_parts(pairs, n_items, out, part):
    """Bring every shard's (global index, record) pairs together → all n_items records in index order, i.e. the
    list a single process makes; None where this process is not the one that writes OUT.
      'all'       the pairs are everything       'torchrun'  gathered on rank 0 (None on the other ranks)
      'job'       written to OUT.part-i-of-N (→ None)      'merge'  read back from the N part files
    A missing or duplicated index (a part missing, or made with other flags) is an error, never a silent gap."""
    i, n, how = part
    if how == "job":
        write_jsonl(part_path(out, i, n), [{"index": k, "record": r} for k, r in pairs])
        return None
    if how == "torchrun":
        gathered = [None] * n if is_main() else None
        dist.gather_object(list(pairs), gathered, dst=0)
        if not is_main():
            return None
        pairs = [p for g in gathered for p in g]
    elif how == "merge":
        pairs = []
        for s in range(n):
            path = part_path(out, s, n)
            pairs += [(x["index"], x["record"]) for x in read_jsonl(path, required=("index", "record"))]
    pairs = sorted(pairs, key=lambda p: p[0])
    if [k for k, _ in pairs] != list(range(n_items)):
        have = {k for k, _ in pairs}
        raise DataError(f"{out}: the parts do not add up to the {n_items} records of this input ({len(pairs)} "
                        f"records, {len(have)} distinct, {len(set(range(n_items)) - have)} missing): were all "
                        f"{n} parts made with the same flags?")
    return [r for _, r in pairs]
