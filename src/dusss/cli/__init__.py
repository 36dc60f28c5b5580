"""The `dusss` command line: a thin typer app over the library (one command per pipeline stage).

Errors from the library (DusssError) print as one line and exit 1; `--debug` anywhere shows the traceback.
"""

from __future__ import annotations

import sys

import click
import typer

from dusss.errors import DusssError

app = typer.Typer(
    name="dusss",
    help="Text-guided semi-supervised medical image segmentation (DuSSS / AMVLM).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


_REGISTERED = False


def _register() -> None:
    """Attach the commands once (main() may run many times in one process, e.g. in tests)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    from dusss.cli import commands, data, export

    app.add_typer(data.data_app, name="data")
    commands.register(app)
    export.register(app)


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    """`click.exceptions.<name>` from click and from typer's bundled copy of click (typer >= 0.20)."""
    classes = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as bundled  # type: ignore[import-not-found]

        classes.append(getattr(bundled, name))
    except (ImportError, AttributeError):
        pass
    return tuple(classes)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; turns user errors into one line and a non-zero exit."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    _register()
    command = typer.main.get_command(app)
    try:
        result = command.main(args=args, prog_name="dusss", standalone_mode=False)
    except _click_classes("Exit") as exc:
        sys.exit(exc.exit_code)  # type: ignore[attr-defined]
    except _click_classes("ClickException") as exc:
        exc.show()  # type: ignore[attr-defined]
        sys.exit(exc.exit_code)  # type: ignore[attr-defined]
    except _click_classes("Abort"):
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except DusssError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:  # a file the user named cannot be read or written: name it and the reason
        if debug:
            raise
        if exc.filename is not None and exc.strerror:
            print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        else:
            first = str(exc).splitlines()[0] if str(exc) else ""
            print(f"error: {type(exc).__name__}: {first} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: {type(exc).__name__}: {first} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
    if isinstance(result, int) and result != 0:
        sys.exit(result)
