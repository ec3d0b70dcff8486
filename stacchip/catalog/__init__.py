"""Catalog-scale indexing: bulk indexing of many STAC items (:mod:`stacchip.catalog.bulk`)."""
