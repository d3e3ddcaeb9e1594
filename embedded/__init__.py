"""The pack's embedded default: the small trained shapes model (``shapes_model``, weights in
``models/hires_shapes.safetensors``) and the main command that renders with it (``run_default``):

    python -m hires_parallel.embedded.run_default --out out/shapes_2x.png     # pack installed with pip
    python <the pack>/embedded/run_default.py --out out/shapes_2x.png         # any copy of the pack

Nothing here is imported by the nodes; importing this package imports nothing heavy.
"""
