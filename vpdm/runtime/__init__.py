"""Where and how tensors run: devices and reduced precision."""
