"""The runtime of the DPA stages: strict I/O, resumable logs and checkpoints, torchrun/FSDP2, model resolution.
A reader of the stages can skip it: every call site is one line."""
