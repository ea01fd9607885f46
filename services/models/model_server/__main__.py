"""`python -m services.models.model_server --model-name M --version N --base-path DIR ...`"""
from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's C++ INFO lines (CPU features, MLIR passes) are noise here.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    from services.models.model_server.config import parse_settings

    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from services.models.model_server.server import run  # imports TensorFlow (~5 s)

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
