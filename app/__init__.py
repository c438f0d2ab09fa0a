"""The live Dash dashboard for cockpit logs."""

__all__: list[str] = []
