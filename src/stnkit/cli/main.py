"""Entry point of the ``stnkit`` command.

Each subcommand lives in its own module under :mod:`stnkit.cli` and exposes a
``click.Command`` named ``command``. The group below imports a subcommand only
when it runs, so ``stnkit --help`` stays fast and a missing optional
dependency of one command never breaks the others.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

try:
    import click
except ImportError:  # pragma: no cover - exercised only without the [all] extra
    click = None

# name -> (module, one-line help). Order is the order shown by --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("stnkit.cli.demo", "Run the built-in demo and write its figures."),
    "download": ("stnkit.cli.download", "Download MNIST or Fashion-MNIST with checksum verification."),
    "models": ("stnkit.cli.models", "List the model architectures and their parameter counts."),
    "train": ("stnkit.cli.train", "Train a classifier on a distorted-MNIST task."),
    "eval": ("stnkit.cli.evaluate", "Evaluate a checkpoint on a task's test set."),
    "figure": ("stnkit.cli.figure", "Draw a Fig. 1-style figure for a checkpoint."),
    "table1": ("stnkit.cli.table1", "Train and evaluate the grid of the ST paper's Table 1."),
    "train-aligner": ("stnkit.cli.train_aligner", "Train an aligner self-supervised on a folder of images."),
    "align": ("stnkit.cli.align", "Align an image (or a folder of images) to a support image."),
    "invariance": ("stnkit.cli.invariance", "Measure how invariant a checkpoint is to a transformation."),
    "average": ("stnkit.cli.average", "Average the weights of checkpoints of one architecture."),
    "export": ("stnkit.cli.export", "Export a checkpoint to ONNX."),
}


class CLIError(Exception):
    """An error the CLI reports as one line on stderr with a non-zero exit."""


if click is not None:

    class LazyGroup(click.Group):
        """A group that lists every command and imports one only when it runs."""

        def list_commands(self, ctx: click.Context) -> list[str]:
            return [name for name, (module, _) in COMMANDS.items() if importlib.util.find_spec(module)]

        def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
            if name not in COMMANDS:
                return None
            module_name, short_help = COMMANDS[name]
            if importlib.util.find_spec(module_name) is None:
                return None
            command = importlib.import_module(module_name).command
            command.short_help = command.short_help or short_help
            return command

    @click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
    @click.version_option(package_name="stnkit")
    def cli() -> None:
        """stnkit: spatial transformer networks for PyTorch."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; any :class:`CLIError` or bad-input error becomes one line and exit code 1 or 2."""
    if click is None:
        print("stnkit: the command-line tool needs the optional dependencies: pip install 'stnkit[all]'", file=sys.stderr)
        return 2
    try:
        cli.main(args=argv, prog_name="stnkit", standalone_mode=False)
    except click.exceptions.Abort:
        print("stnkit: aborted", file=sys.stderr)
        return 130
    except click.ClickException as exc:  # usage errors, bad parameters
        print(f"stnkit: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except (CLIError, ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, OSError) as exc:
        print(f"stnkit: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stnkit: interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """Console-script entry point."""
    from stnkit.training.allocator import tune_cpu_allocator

    tune_cpu_allocator()  # a process of its own: keeping freed memory makes CPU steps up to 30% faster
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
