"""SIFT-based ablation ([THESIS] ch. 4): a reconstructible decomposition of an image into feature
cells around its scale-space keypoints, and saliency over the K keypoint gains.

    keypoints.py      E_SIFT: the keypoints (scikit-image's SIFT on the grey reduction, sec. 4.1.2)
    decomposition.py  D_SIFT: feature cells, sparsity and mass redistribution, the linear decoder
                      (sec. 4.1.3-4.2.4, eq. 4.18-4.41)
    heatmaps.py       Voronoi (eq. 4.46-4.47) and band-pass (eq. 4.48) heatmaps from gains
    ablation.py       SiftAblation: the ablation path over the gains (sec. 4.3, eq. 4.43-4.45)
    rise.py           SiftRise: random on/off gains with RELAX's one-pass estimator (beyond the thesis)

The job methods are xaiserve.service.jobs.sift.SiftAblationJobMethod and SiftRiseJobMethod.
"""

from xaiserve.handlers.sift.ablation import SiftAblation, SiftAblationConfig, SiftAblationOutput
from xaiserve.handlers.sift.decomposition import DecompositionConfig, SiftDecoder, decompose
from xaiserve.handlers.sift.keypoints import KeypointConfig, Keypoints, detect
from xaiserve.handlers.sift.rise import SiftRise, SiftRiseConfig, SiftRiseOutput

__all__ = [
    "DecompositionConfig",
    "KeypointConfig",
    "Keypoints",
    "SiftAblation",
    "SiftAblationConfig",
    "SiftAblationOutput",
    "SiftDecoder",
    "SiftRise",
    "SiftRiseConfig",
    "SiftRiseOutput",
    "decompose",
    "detect",
]
