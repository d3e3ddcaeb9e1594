"""Planning of patch-parallel runs: what a model exchanges per step (exchange_pattern), what a rig can do (rig),
how long a step takes (cost_model) and which plan to run (planner). torch + stdlib only; ComfyUI is imported
lazily, only by comfy_shapes when a description is read from a real module."""
