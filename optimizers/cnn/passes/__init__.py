"""The CNN passes (``winograd``, ``cnn_static_int8``, ``channel_prune``) and their chains.

The registry imports every module of this package; importing the package registers the
candidate chains the search runs for CNNs.
"""

from optimizers.registry import register_chains

register_chains(
    "cnn",
    [
        ["winograd"],
        ["cnn_static_int8"],
        ["channel_prune"],
        [("channel_prune", {"flops_budget": 0.75})],
        ["channel_prune", "cnn_static_int8"],
    ],
)
