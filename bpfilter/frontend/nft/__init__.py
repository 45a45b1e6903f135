"""The nftables dialect: `nft list ruleset` text to IR (parser) and back (save)."""
