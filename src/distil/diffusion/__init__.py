"""Diffusion models and their distillation: a small class-conditional pixel-space teacher,
samplers, an offline sample-quality metric and the step/guidance distillation losses.

* :mod:`~distil.diffusion.schedule` the noising process, ε/v/x₀ conversions;
* :mod:`~distil.diffusion.model` UNet teacher, guidance-conditioned and adapter students, model
  folders, EMA;
* :mod:`~distil.diffusion.data` Fashion-MNIST / MNIST-5k at 16×16 in [−1, 1];
* :mod:`~distil.diffusion.sampling` diffusers schedulers, DDIM grids, paper #1's training-free
  sampler, classifier-free guidance, NFE counting, guided trajectories;
* :mod:`~distil.diffusion.losses` teacher training and progressive / guidance / consistency /
  adapter-guidance distillation losses (one micro-batch each);
* :mod:`~distil.diffusion.metrics` Fréchet and kernel distances in a local classifier's features,
  class fidelity, the real-vs-real floor;
* :mod:`~distil.diffusion.grids` PNG sample grids (``distil sample``).

Sources and constants: ``docs/diffusion.md``.
"""
