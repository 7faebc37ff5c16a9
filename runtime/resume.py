"""Resumable work: the append-only logs of sample.py/score.py (OUT.partial), RNG states and atomic training
checkpoints, each tied to a fingerprint of the job that made it."""
import json
import math
import os
import random

import numpy as np
import torch

from runtime.io import DataError, atomic_write


# ----------------------------------------------------------------------------- resumable sweeps and checkpoints
def _plain(x):
    """JSON round trip (tuples → lists), so fingerprints compare equal after being stored."""
    return json.loads(json.dumps(x))


def _differ(old, new):
    """The keys on which two job fingerprints differ, for the error message."""
    return ", ".join(sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)))


def model_stamp(path):
    """What identifies a model for a resumed run: a local folder's file names, sizes and mtimes; else the hub id."""
    if not os.path.isdir(path):
        return path
    return sorted([n, os.stat(os.path.join(path, n)).st_size, os.stat(os.path.join(path, n)).st_mtime_ns]
                  for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))


def open_partial(path, fingerprint, overwrite):
    """Resume an interrupted sweep from its append-only log PATH (OUT.partial): line 1 holds the job's fingerprint,
    every further line one finished record. A log of another job is refused (discarded with --overwrite, which always
    starts over); a torn last line — the process was killed mid-write — is cut off.
    → (finished records, append(records)): append writes records with one write and flushes them to disk; the log
    is created by the first append, so a run that fails before finishing anything leaves no file."""
    fingerprint = {"partial": _plain(fingerprint)}
    records, fresh = [], True
    if os.path.exists(path) and not overwrite:
        with open(path, "rb") as f:
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]  # everything up to the last newline; the rest is a torn write
        lines = complete.decode("utf-8", errors="replace").splitlines()
        if lines:
            try:
                head = json.loads(lines[0])
            except json.JSONDecodeError:
                head = None
            if head != fingerprint:
                old = head.get("partial") if isinstance(head, dict) and isinstance(head.get("partial"), dict) else {}
                raise SystemExit(f"error: {path} is the log of a different job (differs in: "
                                 f"{_differ(old, fingerprint['partial'])}); pass --overwrite to discard it and start over")
            for k, line in enumerate(lines[1:], 2):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DataError(f"{path}:{k}: malformed JSON in the log of an interrupted run; delete it or "
                                    f"pass --overwrite") from None
            if len(complete) < len(data):
                with open(path, "r+b") as f:
                    f.truncate(len(complete))
            fresh = False

    def append(new):
        nonlocal fresh
        lines = ([fingerprint] if fresh else []) + list(new)
        with open(path, "w" if fresh else "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in lines))
            f.flush()
            os.fsync(f.fileno())
        fresh = False
    return records, append


def rng_state():
    """Python, NumPy and torch generator states, in types torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, state):
    """torch.save to a temp file in the same folder, then os.replace: a crash leaves the previous checkpoint."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def check_finite_loss(loss, step, flags):
    """Stop a training run at the first non-finite loss (NaN/inf: a learning rate or β out of range, overflow) with one
    line, before the optimizer applies it; nothing is saved."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise SystemExit(f"error: step {step}: the loss is {value} (not finite); nothing was saved. Check {flags}, or "
                         f"try --dtype float32")


def check_finite_weights(model, flags):
    """Refuse to save a model with a NaN/inf weight (e.g. a huge learning rate): one line naming the first tensor."""
    for name, p in model.named_parameters():
        t = p.detach().to_local() if hasattr(p, "to_local") else p.detach()  # FSDP2: this rank's shard
        if not torch.isfinite(t).all():
            raise SystemExit(f"error: the trained weights are not finite ({name}); nothing was saved. Check {flags}")


def load_checkpoint(path, fingerprint):
    """A checkpoint of save_checkpoint, if it was made by the same job (same data and flags); else exit."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — a truncated or corrupt file (checkpoints are renamed into place whole)
        raise SystemExit(f"error: {path} cannot be read ({type(e).__name__}: {str(e)[:120]}); delete it, or pass "
                         f"--overwrite without --resume to start over") from None
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise SystemExit(f"error: {path} is not a checkpoint of this code; pass --overwrite without --resume")
    old, new = state.get("fingerprint", {}), _plain(fingerprint)
    if old != new:
        raise SystemExit(f"error: {path} was made by a different job (differs in: {_differ(old, new)}); pass "
                         f"--overwrite without --resume to start over")
    return state


def job_fingerprint(flags, world, **inputs):
    """What a training checkpoint must match to be resumed (load_checkpoint): the flags less those that say only where
    and how often to write, the inputs given (their files' digests, by flag name) and the number of ranks."""
    job = {k: v for k, v in flags.items() if k not in ("out", "save_every", "resume", "overwrite")}
    job.update(inputs)
    job["world"] = world
    return job


def resume_training(ckpt, job, out, model, opt, stage, replay):
    """Continue a training run from OUT/checkpoint.pt (ckpt; None: a fresh start) → (step, log): the checkpoint is
    checked against the job's fingerprint, the model and optimizer loaded (FSDP2: each rank its own shards),
    replay(step) fast-forwards the data stream to where the run stopped, and the RNG states are restored."""
    if not ckpt:
        return 0, []
    state = load_checkpoint(ckpt, job)
    load_training(state, out, model, opt)
    step, log = state["step"], state["log"]
    replay(step)
    set_rng_state(state["rng"])
    print(f"{stage}: resumed from {ckpt} at step {step}")
    return step, log


def _sharded(model):
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def save_training(out, model, opt, state):
    """OUT/checkpoint.pt of a training run: state (fingerprint, step, log, rng, ...) plus the model and optimizer.
    Every rank calls it. A model held whole by every rank (one process, DDP): rank 0 writes it all into
    checkpoint.pt. FSDP2 (sharded parameters): every rank writes its own shards with torch.distributed.checkpoint
    into OUT/checkpoint-stepN.dcp/, then rank 0 writes checkpoint.pt naming that folder and deletes the older one,
    so a crash at any moment leaves one complete checkpoint."""
    import shutil

    from runtime.dist import barrier, is_main
    if _sharded(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        name = f"checkpoint-step{state['step']}.dcp"
        model_state, opt_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "opt": opt_state}, checkpoint_id=os.path.join(out, name))
        barrier()  # every rank's shards are on disk before checkpoint.pt points at them
        state = dict(state, dcp=name)
    else:
        state = dict(state, model=model.state_dict(), opt=opt.state_dict())
    if is_main():
        save_checkpoint(os.path.join(out, "checkpoint.pt"), state)
        for old in os.listdir(out):
            if old.startswith("checkpoint-step") and old != state.get("dcp"):
                shutil.rmtree(os.path.join(out, old))
    barrier()


def load_training(state, out, model, opt):
    """Model and optimizer back from a save_training checkpoint (state: load_checkpoint's); FSDP2 ranks each read
    their own shards (the same number of ranks: the fingerprint holds the world size)."""
    if "dcp" not in state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, opt_state = get_state_dict(model, opt)  # the sharded layout to read into
    loaded = {"model": model_state, "opt": opt_state}
    dcp.load(loaded, checkpoint_id=os.path.join(out, state["dcp"]))
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["opt"])


def drop_checkpoint(out):
    """A finished run: its checkpoint (checkpoint.pt and any FSDP2 shard folder) goes."""
    import shutil
    for name in os.listdir(out):
        if name == "checkpoint.pt":
            os.remove(os.path.join(out, name))
        elif name.startswith("checkpoint-step"):
            shutil.rmtree(os.path.join(out, name))
