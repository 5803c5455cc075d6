"""RELAX and U-RELAX (seed 000): representation explanations with uncertainty.

`from handlers.relax import Relax, RelaxConfig, RelaxOutput`. The job method (ONNX Runtime,
progress, cancellation) is handlers.relax.job.RelaxJobMethod.
"""
from xaiserve.handlers.relax.relax import Relax, RelaxConfig, RelaxOutput, RelaxProgress

__all__ = ["Relax", "RelaxConfig", "RelaxOutput", "RelaxProgress"]
