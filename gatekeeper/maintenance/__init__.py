"""The machine maintenance API (Talos-compatible Version and read-only COSI resources)."""
