"""Networks: the frozen base, the MCM and the baseline adapters (ControlNet, T2I-Adapter).

The lowest layer of ``mcm`` (docs/architecture.md): imports nothing from the other subpackages.
"""
