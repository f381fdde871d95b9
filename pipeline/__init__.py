"""kdpipe: knowledge distillation for vision with a per-view teacher cache.

The stages live in `cache` (run the teacher once over a seeded stream of views and
store its logits) and `train` (replay exactly those views into a student).
"""

__version__ = "0.1.0"
