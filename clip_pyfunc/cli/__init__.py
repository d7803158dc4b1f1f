"""`clip-pyfunc`: run a command, print its result as JSON on stdout (parser, commands; __main__ for
`python -m clip_pyfunc.cli`, spark_submit for spark-submit)."""

from __future__ import annotations

import json
import sys

from clip_pyfunc.cli.commands import JsonLines
from clip_pyfunc.cli.parser import build_parser
from clip_pyfunc.errors import ClipPyfuncError
from clip_pyfunc.stdio import stdout_to_stderr


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; print the result as JSON on stdout (and nothing else there), errors on stderr."""
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("serve", "app"):  # long-running servers; they print no JSON
            args.func(args)
            return 0
        with stdout_to_stderr():
            result = args.func(args)
    except ClipPyfuncError as e:  # what the user sent or configured: one line, exit 2
        message = " ".join(str(e).splitlines())  # a library's reason may span lines
        print(f"clip-pyfunc {args.command}: error: {message}", file=sys.stderr)
        return 2
    if isinstance(result, JsonLines):
        for item in result:
            print(json.dumps(item))
    else:
        print(json.dumps(result, indent=2))
    return 0
