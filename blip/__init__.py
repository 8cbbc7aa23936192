"""blip: the BLIP model library (model, losses, data, generation, evaluation, CapFilt).

Never imports blipctl, typer or rich: the CLI sits on top of this package, not inside it.
"""

__version__ = "0.1.0"
