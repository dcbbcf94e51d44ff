"""Stage 2: sensitivity profiling (rank statistics so far; probes follow)."""
