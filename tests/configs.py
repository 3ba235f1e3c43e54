"""Config helpers shared by the tests."""

import ml_collections


def override(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
    """Sets dotted keys written with '__' for nesting (model__depth=2 -> config.model.depth = 2); returns config."""
    for dotted, value in overrides.items():
        target = config
        *parents, leaf = dotted.split("__")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config
