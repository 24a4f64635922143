"""The reference input pipeline: decode JPEGs with PIL and augment per image in DataLoader
workers, as the MoCo and BYOL repositories do. Kept to measure the cached, on-device path
against (benchmarks/), not used for training.

Both paths crop from the whole image: RandomResizedCrop here runs on the decoded image, and
the cached path draws its boxes over each image's whole region of the cache canvas
(`fgray.data.cache`), at the cache's resolution instead of the source's. The eval views
agree too: `pil_eval_transform` is `eval_transform` with the cache's regions."""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from fgray.data.augment import AugmentConfig
from fgray.data.images import load_rgb
from fgray.data.sample import Sample


def pil_view_transform(cfg: AugmentConfig, which: int) -> T.Compose:
    """The PIL transform equal in distribution to `TwoViewAugment.view(which)`."""
    sigma_scale = cfg.size / 224.0
    radius = max(1, int(3 * cfg.blur_sigma_max * sigma_scale))
    return T.Compose([
        T.RandomResizedCrop(cfg.size, scale=(cfg.scale_min, cfg.scale_max),
                            ratio=(cfg.ratio_min, cfg.ratio_max)),
        T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
                      p=cfg.jitter_p),
        T.RandomGrayscale(p=cfg.gray_p),
        T.RandomApply([T.GaussianBlur(2 * radius + 1, (cfg.blur_sigma_min * sigma_scale,
                                                       cfg.blur_sigma_max * sigma_scale))],
                      p=cfg.blur_p[which]),
        T.RandomSolarize(128, p=cfg.solarize_p[which]),
        T.RandomHorizontalFlip(cfg.flip_p),
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
    ])


def pil_eval_transform(size: int, *, mean: tuple[float, ...], std: tuple[float, ...],
                       crop_fraction: float = 0.875) -> T.Compose:
    """The PIL eval view that `eval_transform(..., regions=...)` computes from the cache:
    shorter side to size / crop_fraction, centre crop `size`. The cache resizes bicubic to
    its decoded size first, so pixels differ slightly where that is not size / crop_fraction."""
    resized = max(size, round(size / crop_fraction))
    return T.Compose([
        T.Resize(resized, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class PILTwoViews(Dataset):
    def __init__(self, samples: list[Sample], cfg: AugmentConfig) -> None:
        self.samples = samples
        self.views = (pil_view_transform(cfg, 0), pil_view_transform(cfg, 1))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        img = load_rgb(self.samples[i].path)
        return self.views[0](img), self.views[1](img), self.samples[i].label


def pil_loader(samples: list[Sample], cfg: AugmentConfig, batch_size: int, workers: int,
               pin_memory: bool = False) -> DataLoader:
    return DataLoader(PILTwoViews(samples, cfg), batch_size=batch_size, shuffle=True,
                      num_workers=workers, drop_last=True, pin_memory=pin_memory,
                      persistent_workers=workers > 0)
