"""Training: config, loss, engine, checkpoints, evaluation."""
from lmnet.train.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
