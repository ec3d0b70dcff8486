"""Exports of chips for training, in parts: what prechip (cubes) and stats (band statistics) share.

* :mod:`stacchip.export.selection`: which chips, in which order (filters, the
  seeded shuffle, cube membership and its fingerprint, empty selections);
* :mod:`stacchip.export.chip_reader`: reading the chips of many items (read
  tasks, a process pool) and the per-process chipper cache that the training
  side's ``ChipDataset`` shares;
* :mod:`stacchip.export.cube`: the npz cube format and cube names;
* :mod:`stacchip.export.shards`: the WebDataset shard format (one sample per
  chip, the same chips and order as the cubes);
* :mod:`stacchip.export.outputs`: both formats behind one interface;
* :mod:`stacchip.export.codec`: ISA-L DEFLATE in standard zip and gzip containers;
* :mod:`stacchip.export.locality`: prechip's locality mode (items dealt to
  tasks, each read once in tile order, cubes mixing a few items) and the runner
  reading chips and writing outputs;
* :mod:`stacchip.export.plan`: the plan written once beside the outputs (what
  every array task reads and writes) and the manifest.

The commands (flags, environment variables, array jobs) stay in
:mod:`stacchip.processors.prechip` and :mod:`stacchip.processors.stats`. This
package imports only the core.
"""
