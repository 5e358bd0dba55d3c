"""Which elastic checkpoint a model runs with, if any: ModelConfig.elastic says whether, the
cache (or ModelConfig.elastic_checkpoint) says where; a missing one is built first (elastify)."""

from __future__ import annotations

import logging

from engine.config import ModelConfig
from engine.model.loader import ModelSource

logger = logging.getLogger(__name__)


def wants_elastic(config: ModelConfig) -> bool:
    """auto: the default model is elastic (its checkpoint is built on first use); others only on asking."""
    if config.elastic == "auto":
        return config.model is None or config.elastic_checkpoint is not None
    return config.elastic == "on"


def load_elastic_checkpoint(config: ModelConfig, source: ModelSource):
    if not wants_elastic(config):
        return None
    from engine.elastic.checkpoint import load_checkpoint  # TODO(merge): elastify branch

    if config.elastic_checkpoint is not None:
        return load_checkpoint(config.elastic_checkpoint, source.path)
    from engine.elastic.elastify import ensure_checkpoint  # elastification imports the heavy tools

    directory = ensure_checkpoint(source)
    logger.info("elastic checkpoint: %s", directory)
    return load_checkpoint(directory, source.path)
