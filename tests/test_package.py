import importlib


def test_packages_import():
    for name in ("cockpit", "instruments", "app"):
        assert importlib.import_module(name).__doc__
