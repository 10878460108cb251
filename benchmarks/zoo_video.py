"""torchvision's video classification models as a zoo for ``mudsc-fx check`` (random weights,
eval mode, batch 1). Inputs are clips of 4 frames at 64x64 where the architecture accepts any
size, and the clip size the model is built for where it does not (MViT's position tables and
S3D's final pooling need 16 frames at 224x224). HEAVY as a whole: run it under the shared lock.

    flock /tmp/mudsc_heavy.lock mudsc-fx check --zoo benchmarks/zoo_video.py:zoo --jobs 2 \\
          --json benchmarks/results/zoo_video.json
"""
from __future__ import annotations

SMALL = (1, 3, 4, 64, 64)
BUILT_FOR = (1, 3, 16, 224, 224)
NEEDS_FULL_CLIP = ("mvit_v1_b", "mvit_v2_s", "s3d")


def zoo(pattern=None):
    """Yields (name, factory, input shape) for every video model of the installed torchvision."""
    import fnmatch

    import torchvision
    for name in torchvision.models.list_models(module=torchvision.models.video):
        if pattern and not fnmatch.fnmatchcase(name, pattern):
            continue
        shape = BUILT_FOR if name in NEEDS_FULL_CLIP else SMALL
        yield name, (lambda n=name: torchvision.models.get_model(n, weights=None)), shape
