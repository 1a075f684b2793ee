"""The ingress firewall: policy documents, the nftables renderer, the applier and the explainer."""
