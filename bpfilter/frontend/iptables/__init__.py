"""The iptables dialect: iptables-save text to IR (parser) and back (save)."""
