"""LoRAs: read every FLUX LoRA format, merge them into weights, export kohya side-cars.

- ``formats``: detects and normalizes kohya, ComfyUI, diffusers/PEFT, OneTrainer, BFL control,
  fal Kontext and XLabs files into one canonical form (BFL tensor names, row slices).
- ``merge``: ``W' = W + strength * (alpha/rank) * B@A`` on the float32 source, as a tensor
  transform for the pipeline; ``lowrank``: the exact, thread-count-independent ``B@A`` kernel.
- ``export``: writes kohya-named side-car files.

May import: the converter core, ``quant_kernels``, ``manifests``.
Never: ``converter.release``, ``converter.quality``, ``converter.hub``, ``converter.cli``.
"""
