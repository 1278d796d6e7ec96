"""The ``vitad`` command (``python -m vitad``): ``vitad predict ...`` scores new images with a
fitted model (:mod:`vitad.serving.predict`); ``vitad exps ...`` shows ``dvc exp show`` narrow
(:mod:`vitad.experiments`)."""

from __future__ import annotations

import sys

from vitad.core.cli import EXPECTED_ERRORS

COMMANDS = ("predict", "exps")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: vitad {{{','.join(COMMANDS)}}} ... (vitad predict --help, vitad exps --help)", file=sys.stderr)
        return 2
    if argv[0] == "exps":
        from vitad import experiments

        experiments.main(argv[1:])
        return 0
    from vitad.serving import predict  # torch and the backbones take seconds to import: only for a command

    try:
        return predict.main(argv[1:])
    except EXPECTED_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
