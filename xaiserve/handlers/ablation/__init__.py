"""Optimised ablation paths ([THESIS], Part II ch. 2): a monotone, constant-speed path of masks from
the target image to a baseline, optimised so that the classification survives (or dissipates)
along it, returned whole for inspection. The job method is xaiserve.service.jobs.ablation.AblationJobMethod.
"""

from xaiserve.handlers.ablation.optimiser import AblationConfig, AblationOutput, AblationPath, AblationProgress

__all__ = ["AblationConfig", "AblationOutput", "AblationPath", "AblationProgress"]
