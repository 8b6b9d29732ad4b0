"""What will it cost: the toolkit's memory and speed figures, measured and predicted, in one room.

- `meters`: peak memory of real tensors while a step runs (allocated, reserved, device-level,
  host), its breakdown by category (PyTorch's MemTracker), the profiler's timeline and snapshots;
- `measure`: one configuration's real steps: peak, speed, MFU;
- `forecast`: one configuration's peak on fake tensors, on any machine;
- `cuda_rules`: CUDA's autocast casts applied to the forecast's CPU step;
- `gpu_overheads`: what a GPU holds beyond the tensors (CUDA context, workspaces, transients);
- `reference`: the measured H100 figures the forecast is checked against (data under docs/);
- `planner`: the fastest plan that fits a card, measured or predicted.

This package's `__init__` imports nothing: `meters`, `cuda_rules` and `reference` sit on the
lowest floor (the training loop reads its meters), the others above the engine.
"""
