"""Rotation-equivariant spiral-CNN Cryo-EM denoiser ([THESIS], ch. 6-7) and its cartesian baseline.

Modules (one job each):
    geometry      spiral sampling (eq. 7.5-7.7), ribbon, Delaunay/barycentric resampling operators
    layers        torch resampling (gather / GridSample), SpiralConv, the cartesian twin
    networks      DenoiserConfig, Denoiser (raw particles in, denoised out), per-particle scaling
    equivariance  rotations (sinc three-shear, bilinear) and the equivariance error
    metrics       MSE / PSNR on the unit disc
    train         training loop with per-epoch curves (Fig. 7.7-7.9)
    export        checkpoints, ONNX export and parity, loading from the model store
    card          the model card
    mrc           MRC stacks in files and bytes (mrcfile)
    serving       DenoiseRequest -> model input; output -> MRC bytes
    client_io     read_stack / write_stack for the `xaiserve denoise` client
"""
