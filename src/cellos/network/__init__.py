"""Per-cell network authority (L2): namespaces, veth, nftables egress, DNS and L7 proxies."""
