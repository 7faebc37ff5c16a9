"""The runtime of the DPA stages: strict I/O, resumable logs and checkpoints, torchrun/FSDP2, model resolution.
A reader of the stages can skip it: every call site is one line."""
import os

# model conversions and feature caches (git-ignored); here and not in models.py, so tools.prepare can check for the
# converted model without importing torch
CACHE_DIR = os.environ.get("DPA_CACHE", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                     ".cache"))
