"""Lab plumbing: network namespaces, veth pairs and processes for the demo and the tests."""
