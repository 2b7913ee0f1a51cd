"""Where and how a process runs: devices, memory, the hub, accelerate's processes."""
