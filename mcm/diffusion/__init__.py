"""The math of diffusion around a frozen base: training forward process, sampling loop, composition.

Imports only from ``mcm.models`` (docs/architecture.md).
"""
