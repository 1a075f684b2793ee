"""Configuration: the siderolink.api URL, the kernel command line and SideroLinkConfig documents."""
