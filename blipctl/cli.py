"""The `blipctl` Typer app: one thin function per subcommand, each in blipctl/commands/<name>.py.

Heavy imports (torch, transformers) happen inside the commands, so `blipctl --help` stays fast.
"""

from __future__ import annotations

import typer

from blipctl.registry import register_all

app = typer.Typer(
    name="blipctl",
    help=(
        "BLIP vision-language bootstrapping: pre-train, fine-tune a captioner and a filter, bootstrap clean data "
        "with CapFilt, evaluate, and move checkpoints between blipctl, Hugging Face and the original .pth format."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

register_all(app)  # blipctl/registry.py: the commands, in `blipctl --help` order


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
