"""Shared pytest configuration."""

import os

# GDAL must never try the network for anything but loopback in tests.
os.environ.setdefault("GDAL_HTTP_TIMEOUT", "20")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

pytest_plugins = ["tests.services"]
