"""Pure torch algorithms: no ComfyUI import anywhere below this package.

Every function works on tensors and, where a model is needed, a ``denoise(x, sigma) -> D`` callable.
"""
