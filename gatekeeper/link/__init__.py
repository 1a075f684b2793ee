"""The link lifecycle as a sans-I/O state machine: provision, configure, watch, re-provision."""
