"""Re-export of the static ``.pt2`` / torch-file pickle scanner, now in ``optimizers.pickle_scan``.

The offline CLI (``optimizers.loaders.load_pt2``) and the server's job path share one scanner.
"""

from optimizers.pickle_scan import (
    SAFE_GLOBALS,
    check_pickle_stream,
    check_pt2,
    check_torch_file,
    safe_global,
)

__all__ = ["SAFE_GLOBALS", "check_pickle_stream", "check_pt2", "check_torch_file", "safe_global"]
