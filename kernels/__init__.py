"""Kernels of inlaid-ray (installed as `inlaid_ray.kernels`): Triton ops with PyTorch
references of identical signature in `reference.py`."""
