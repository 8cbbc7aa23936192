"""Image transforms: any PIL mode to RGB, the original BLIP training and evaluation pipelines.

Built on torchvision. Evaluation is exactly the original (PIL bicubic resize of the PIL image to (s, s), ToTensor,
CLIP mean/std). Training is RandomResizedCrop (bicubic) -> horizontal flip -> RandomAugment -> ToTensor -> normalise,
as the original; RandomAugment reuses torchvision's RandAugment ops with the original op list and magnitudes.
Deviations from the original's OpenCV RandomAugment, all below the level of the distribution of outputs:

* The ops run through torchvision (PIL affine / ImageOps) instead of cv2.warpAffine: same bilinear interpolation,
  same fill (128, 128, 128), same magnitudes; the sign convention of shear/translate/rotate may be mirrored, which
  does not matter because the sign is random.
* Random numbers come from torch's generator instead of numpy's, so the loader can seed them per sample.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode, RandAugment

from blip.data.images import to_rgb

__all__ = ["CLIP_MEAN", "CLIP_STD", "RandomAugment", "eval_transform", "to_rgb", "train_transform"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _BlipOps(RandAugment):
    """torchvision's RandAugment, restricted to the original BLIP op list and magnitude scale (levels 0..10)."""

    def _augmentation_space(self, num_bins: int, image_size: tuple[int, int]) -> dict[str, tuple[torch.Tensor, bool]]:
        level = torch.linspace(0.0, 1.0, num_bins)  # level / MAX_LEVEL
        enhance = level * 1.8 + 0.1 - 1.0  # the original's factor (level/10*1.8+0.1), as torchvision's 1+magnitude
        none = torch.tensor(0.0)
        return {
            "Identity": (none, False),
            "AutoContrast": (none, False),
            "Brightness": (enhance, False),
            "Sharpness": (enhance, False),
            "Equalize": (none, False),
            "ShearX": (level * 0.3, True),
            "ShearY": (level * 0.3, True),
            "TranslateX": (level * 10.0, True),  # pixels, not a fraction of the size (translate_const=10)
            "TranslateY": (level * 10.0, True),
            "Rotate": (level * 30.0, True),
        }


class RandomAugment(nn.Module):
    """The original `RandomAugment(N, M, isPIL=True, augs=[...])`: N ops drawn with replacement, each applied with
    probability p. At the default M=5, Brightness and Sharpness have factor 1.0 (no-ops), as in the original."""

    def __init__(self, num_ops: int = 2, magnitude: int = 5, p: float = 0.5):
        super().__init__()
        if not 0 <= magnitude <= 10:
            raise ValueError(f"magnitude must be in 0..10, got {magnitude}")
        self.num_ops, self.p = num_ops, p
        self.op = _BlipOps(
            num_ops=1,
            magnitude=magnitude,
            num_magnitude_bins=11,
            interpolation=InterpolationMode.BILINEAR,
            fill=[128, 128, 128],
        )

    def forward(self, img: Image.Image) -> Image.Image:
        # "apply a uniformly drawn op with probability p", N times: the same distribution as the original's
        # "draw N ops, skip each with probability 1-p"
        for _ in range(self.num_ops):
            if float(torch.rand(())) < self.p:
                img = self.op(img)
        return img

    def extra_repr(self) -> str:
        return f"num_ops={self.num_ops}, magnitude={self.op.magnitude}, p={self.p}"


def eval_transform(image_size: int) -> T.Compose:
    """PIL -> float tensor (3, s, s): bicubic resize of the PIL image to (s, s), ToTensor, CLIP mean/std."""
    return T.Compose(
        [
            T.Lambda(to_rgb),
            T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def train_transform(
    image_size: int,
    min_scale: float = 0.5,
    randaugment: bool = True,
    hflip: bool = True,
    num_ops: int = 2,
    magnitude: int = 5,
) -> T.Compose:
    """PIL -> float tensor (3, s, s) with the original training augmentation (min_scale 0.2 pre-training, 0.5
    fine-tuning). Randomness comes from torch's global generator; the loader seeds it per sample.

    hflip=False is for data whose captions say "left"/"right" (the demo world): a flip would make them wrong.
    """
    steps: list = [
        T.Lambda(to_rgb),
        T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if randaugment:
        steps.append(RandomAugment(num_ops, magnitude))
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(steps)
