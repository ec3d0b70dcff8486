"""Pytest plugins for every test path (tests/ and docs/, see ``testpaths`` in pyproject.toml).

Registered here, at the root, so that ``python -m pytest docs/some-page.md`` finds them too:
the loopback services (tests/services.py) and the documentation examples (tests/docs_examples.py).
"""

pytest_plugins = ["tests.services", "tests.docs_examples"]
