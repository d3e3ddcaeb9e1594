"""Helpers shared by the test layers (tiny real ComfyUI models, ...)."""
