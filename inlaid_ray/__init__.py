"""inlaid-ray: one quantized base LLM, thousands of LoRA adapters, served on Ray Serve."""

__version__ = "0.1.0"
