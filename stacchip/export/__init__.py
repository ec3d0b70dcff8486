"""Exports of chips for training, in parts: what prechip (cubes) and stats (band statistics) share.

* :mod:`stacchip.export.selection`: which chips, in which order (filters, the
  seeded shuffle, cube membership and its fingerprint, empty selections);
* :mod:`stacchip.export.chip_reader`: reading the chips of many items (read
  tasks, a process pool) and the per-process chipper cache that the training
  side's ``ChipDataset`` shares;
* :mod:`stacchip.export.cube`: the npz cube format, cube names and the manifest
  beside them;
* :mod:`stacchip.export.locality`: prechip's locality mode (items dealt to
  tasks, each read once in tile order, cubes mixing a few items).

The commands (flags, environment variables, array jobs) stay in
:mod:`stacchip.processors.prechip` and :mod:`stacchip.processors.stats`. This
package imports only the core.
"""
