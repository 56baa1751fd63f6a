"""The kernel model (``mmsim.server.mm``): one module per kernel source file, with the locks, RCU,
the scheduler and the detectors beside them. It imports nothing from the service or the tools."""
