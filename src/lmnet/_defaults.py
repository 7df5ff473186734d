"""Defaults stated once for every layer: the per-channel normalisation of ``image / 255``."""

#: ImageNet's mean and std, the default of every config and pretrained model.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
