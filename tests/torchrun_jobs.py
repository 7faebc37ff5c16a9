"""Run several stages one after another in the processes of one torchrun launch, so that tests/test_distributed.py
pays torchrun's start-up (interpreters, imports, process group) once:

    torchrun --standalone --nproc_per_node=2 tests/torchrun_jobs.py JOBS.json

JOBS.json: a list of {"stage": "finetune", "argv": [...], "stop_at_step": k (optional)}. Each job is the stage's
main(argv) on every rank, exactly as `torchrun stage.py argv` runs it. stop_at_step interrupts a training run on every
rank when step k begins (as a crash would, after the checkpoint of step k), to test --resume under DDP.
Rank 0 prints `== job i` before each job's output. The ranks wait for each other between jobs (as separate launches
would: a job's files are all written when the next one starts).
"""
import importlib
import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the stage modules


class Stop(Exception):
    pass


def main():
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for i, job in enumerate(jobs):
        if dist.is_initialized():
            dist.barrier()
        if os.environ.get("RANK", "0") == "0":
            print(f"== job {i}: {job['stage']}", flush=True)
        stage = importlib.import_module(job["stage"])
        get_lr = stage.get_lr if hasattr(stage, "get_lr") else None
        if "stop_at_step" in job:
            def stopping(step, *a, _k=job["stop_at_step"], _f=get_lr):
                if step == _k:
                    raise Stop
                return _f(step, *a)
            stage.get_lr = stopping
        try:
            stage.main([str(a) for a in job["argv"]])
        except Stop:
            print(f"stopped at step {job['stop_at_step']}", flush=True)
        finally:
            if get_lr is not None:
                stage.get_lr = get_lr


if __name__ == "__main__":
    main()
