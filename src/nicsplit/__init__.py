"""nicsplit: continuous data protection for virtual disks, with the write
splitter's heavy half offloaded to a (emulated) SmartNIC."""

__version__ = "0.1.0"
