"""CellOS: run one declared workload with a narrow authority and leave signed evidence."""

__version__ = "0.1.0"
