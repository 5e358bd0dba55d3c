"""Which elastic checkpoint a model runs with, if any: ModelConfig.elastic says whether, the
user cache (or ModelConfig.elastic_checkpoint) says where; a missing one is built first by
elastification (engine/elastic/elastify.py, a couple of minutes with progress, then cached)."""

from __future__ import annotations

import logging
from pathlib import Path

from engine.config import ConfigError, ModelConfig
from engine.elastic.checkpoint import SPEC_FILE, ElasticCheckpoint, elastic_cache_dir, load_checkpoint, source_digest
from engine.model.loader import ModelSource

logger = logging.getLogger(__name__)


def wants_elastic(config: ModelConfig) -> bool:
    """auto: the default model is elastic (its checkpoint built on first use); others when a
    checkpoint is named.  on: always (building one if missing).  off: never."""
    if config.elastic == "auto":
        return config.model is None or config.elastic_checkpoint is not None
    return config.elastic == "on"


def load_elastic_checkpoint(config: ModelConfig, source: ModelSource) -> ElasticCheckpoint | None:
    if not wants_elastic(config):
        return None
    if config.elastic_checkpoint is not None:
        directory = Path(config.elastic_checkpoint).expanduser()
        if not (directory / SPEC_FILE).is_file():
            raise ConfigError(f"elastic_checkpoint {directory} holds no elastic checkpoint ({SPEC_FILE})")
    else:
        directory = elastic_cache_dir(source.path)
        if not (directory / SPEC_FILE).is_file():
            _build(config, source, directory)
    checkpoint = load_checkpoint(directory)
    if checkpoint.spec.source_digest != source_digest(source.path):
        raise ConfigError(f"the elastic checkpoint in {directory} was made from another model file than "
                          f"{source.path}; rebuild it with `engine elastify --model {source.path} --force`")
    logger.info("elastic levels %s from %s", list(checkpoint.spec.level_values), directory)
    return checkpoint


def _build(config: ModelConfig, source: ModelSource, directory: Path) -> None:
    from engine.elastic.elastify import elastify  # the calibration tools load only when needed

    logger.info("no elastic checkpoint for %s yet: building one (once; cached in %s)", source.name, directory)
    result = elastify(config.model, directory=directory)
    logger.info("elastic checkpoint built in %.0f s", result.seconds)
