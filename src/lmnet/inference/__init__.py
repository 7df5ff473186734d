"""Inference with trained models: preprocessing, prediction on any image size, masks and overlays.

(``lmnet.deploy(model)`` is the re-parameterisation entry point; this package uses it.)
"""
