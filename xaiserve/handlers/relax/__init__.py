"""RELAX and U-RELAX ([RELAX]): representation explanations with uncertainty.

`from handlers.relax import Relax, RelaxConfig, RelaxOutput`. The job method (ONNX Runtime,
progress, cancellation) is xaiserve.service.jobs.relax.RelaxJobMethod.
"""

from xaiserve.handlers.relax.relax import Relax, RelaxConfig, RelaxOutput, RelaxProgress

__all__ = ["Relax", "RelaxConfig", "RelaxOutput", "RelaxProgress"]
