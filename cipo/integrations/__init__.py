"""Glue that runs cipo's kernels inside other trainers: :mod:`cipo.integrations.verl`, :mod:`cipo.integrations.trl`.

Each module imports its trainer lazily and only when it is used, so ``import cipo`` never needs verl or TRL.
"""
