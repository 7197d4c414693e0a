"""Training: the loop, resumable state, and the checks every command runs before any work."""
