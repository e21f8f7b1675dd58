"""Shared building blocks of the methods: backbones, noise schedules, noise, diffusion loops.

* ``backbone``: ``build_unet`` (MONAI DiffusionModelUNet, THOR/ci-ber setting), ``BackboneConfig``.
* ``schedules``: ``NoiseSchedule`` / ``make_schedule`` (linear, cosine) and the closed-form steps.
* ``simplex``: batched multi-scale simplex noise in torch (AnoDDPM, pDDPM), at the authors' amplitude.
* ``noise``: per-slice scoring generators (``SliceGenerators``) and Gaussian draws.
* ``augment``: the ci-ber training augmentation (random affine + horizontal flip) in torch.
* ``diffusion``: ``PixelDiffusionConfig`` / ``PixelDiffusionMethod`` (training loop, partial
  noising, reverse chain, one-pass denoising) for the pixel-space diffusion baselines.
* ``accel``: GPU execution (TF32, bf16 autocast, channels_last, ``torch.compile``, a
  prefetching batch loader); no-ops on the CPU.

Submodules are imported lazily by the methods that need them (MONAI is slow to import).
"""
