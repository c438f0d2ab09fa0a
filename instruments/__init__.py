"""Instruments: diagnostics computed every tracked step from what the engine gathered."""

__all__: list[str] = []
