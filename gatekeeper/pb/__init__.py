"""Generated protobuf and gRPC modules, one subpackage per proto/ directory.

Regenerate with ``python -m gatekeeper.pb.generate``; never edit the generated files.
"""
